//! The history of a fault run: every operation's invocation and completion in real-time order,
//! and every fault. It is written out as JSON lines, and the register part is checked for
//! linearizability with the Wing–Gong–Lowe checker of `todc-utils`.

use std::collections::BTreeMap;
use std::io::Write;
use std::path::Path;
use std::sync::Mutex;
use std::time::Instant;

use serde::Serialize;
use todc_utils::linearizability::history::{Action, History};
use todc_utils::linearizability::WGLChecker;
use todc_utils::specifications::etcd::{EtcdOperation, EtcdSpecification, EtcdStatus};

/// How an operation ended. `Unknown`: it may or may not have taken effect (a timeout, a lost
/// connection); it is never counted as a failure.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Outcome {
    Ok,
    Fail,
    Unknown,
}

/// One line of the history file.
#[derive(Clone, Debug, Serialize)]
pub struct Event {
    /// Milliseconds since the run started.
    pub ms: u64,
    /// `register`, `set`, `bank` or `nemesis`.
    pub workload: &'static str,
    pub process: usize,
    /// `invoke` or an [`Outcome`].
    pub phase: String,
    pub op: String,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub key: Option<u32>,
    pub detail: String,
}

/// A register operation as the checker sees it.
#[derive(Clone, Copy, Debug)]
pub enum RegisterOp {
    Read(Option<u32>),
    Write(u32),
    Cas(u32, u32),
}

struct RegisterEvent {
    key: u32,
    process: usize,
    action: Option<Action<EtcdOperation>>,
}

#[derive(Default)]
struct Inner {
    events: Vec<Event>,
    registers: Vec<RegisterEvent>,
    /// Completions of register operations whose outcome is unknown: they go at the end.
    unknown: Vec<RegisterEvent>,
}

pub struct Recorder {
    started: Instant,
    inner: Mutex<Inner>,
}

impl Default for Recorder {
    fn default() -> Self {
        Recorder { started: Instant::now(), inner: Mutex::new(Inner::default()) }
    }
}

/// The invocation of a register operation, to complete with [`Recorder::register_done`].
pub struct Pending {
    index: usize,
    key: u32,
    process: usize,
    op: RegisterOp,
}

fn status(o: Outcome) -> EtcdStatus {
    match o {
        Outcome::Ok => EtcdStatus::Okay,
        Outcome::Fail => EtcdStatus::Fail,
        Outcome::Unknown => EtcdStatus::Unknown,
    }
}

impl Recorder {
    pub fn elapsed_ms(&self) -> u64 {
        self.started.elapsed().as_millis() as u64
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Inner> {
        self.inner.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Records a line of the history (set, bank and nemesis events).
    pub fn note(&self, workload: &'static str, process: usize, phase: &str, op: &str, key: Option<u32>, detail: String) {
        let ms = self.elapsed_ms();
        self.lock().events.push(Event { ms, workload, process, phase: phase.into(), op: op.into(), key, detail });
    }

    pub fn register_invoke(&self, process: usize, key: u32, op: RegisterOp) -> Pending {
        let call = match op {
            RegisterOp::Read(_) => EtcdOperation::Read(EtcdStatus::Invoke, None),
            RegisterOp::Write(v) => EtcdOperation::Write(EtcdStatus::Invoke, v),
            RegisterOp::Cas(c, s) => EtcdOperation::CompareAndSwap(EtcdStatus::Invoke, (c, s)),
        };
        let ms = self.elapsed_ms();
        let mut g = self.lock();
        g.events.push(Event {
            ms,
            workload: "register",
            process,
            phase: "invoke".into(),
            op: format!("{op:?}"),
            key: Some(key),
            detail: String::new(),
        });
        g.registers.push(RegisterEvent { key, process, action: Some(Action::Call(call)) });
        Pending { index: g.registers.len() - 1, key, process, op }
    }

    /// Completes a register operation. A failed read is dropped from the checked history (it
    /// observed nothing); an unknown write or compare-and-swap completes at the very end.
    pub fn register_done(&self, p: Pending, outcome: Outcome, read: Option<u32>) {
        let st = status(outcome);
        let response = match p.op {
            RegisterOp::Read(_) => EtcdOperation::Read(st, read),
            RegisterOp::Write(v) => EtcdOperation::Write(st, v),
            RegisterOp::Cas(c, s) => EtcdOperation::CompareAndSwap(st, (c, s)),
        };
        let ms = self.elapsed_ms();
        let mut g = self.lock();
        let detail = if matches!(p.op, RegisterOp::Read(_)) { format!("{read:?}") } else { String::new() };
        g.events.push(Event {
            ms,
            workload: "register",
            process: p.process,
            phase: format!("{outcome:?}").to_lowercase(),
            op: format!("{:?}", p.op),
            key: Some(p.key),
            detail,
        });
        let ev = RegisterEvent { key: p.key, process: p.process, action: Some(Action::Response(response)) };
        match (p.op, outcome) {
            (RegisterOp::Read(_), Outcome::Ok) => g.registers.push(ev),
            (RegisterOp::Read(_), _) => g.registers[p.index].action = None,
            (_, Outcome::Unknown) => g.unknown.push(ev),
            _ => g.registers.push(ev),
        }
    }

    /// Register operations per key: (completed ok, failed, unknown).
    pub fn register_counts(&self) -> BTreeMap<u32, (usize, usize, usize)> {
        let g = self.lock();
        let mut out: BTreeMap<u32, (usize, usize, usize)> = BTreeMap::new();
        for e in g.events.iter().filter(|e| e.workload == "register") {
            let c = out.entry(e.key.unwrap_or_default()).or_default();
            match e.phase.as_str() {
                "ok" => c.0 += 1,
                "fail" => c.1 += 1,
                "unknown" => c.2 += 1,
                _ => {}
            }
        }
        out
    }

    /// Each key's register history, in the form the checker takes.
    pub fn register_histories(&self) -> BTreeMap<u32, Vec<(usize, Action<EtcdOperation>)>> {
        let g = self.lock();
        let mut out: BTreeMap<u32, Vec<(usize, Action<EtcdOperation>)>> = BTreeMap::new();
        for e in g.registers.iter().chain(g.unknown.iter()) {
            if let Some(a) = &e.action {
                out.entry(e.key).or_default().push((e.process, a.clone()));
            }
        }
        out
    }

    /// Writes the whole history as JSON lines.
    pub fn save(&self, path: &Path) -> anyhow::Result<()> {
        let g = self.lock();
        let mut f = std::io::BufWriter::new(std::fs::File::create(path)?);
        for e in &g.events {
            serde_json::to_writer(&mut f, e)?;
            f.write_all(b"\n")?;
        }
        f.flush()?;
        Ok(())
    }
}

/// Whether one key's history is linearizable (as a register with compare-and-swap).
pub fn linearizable(actions: Vec<(usize, Action<EtcdOperation>)>) -> bool {
    actions.is_empty() || WGLChecker::<EtcdSpecification>::is_linearizable(History::from_actions(actions))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn run(ops: &[(usize, RegisterOp, Outcome, Option<u32>)], overlap: bool) -> bool {
        let r = Recorder::default();
        let key = 1;
        if overlap {
            let pending: Vec<_> = ops.iter().map(|(p, op, _, _)| r.register_invoke(*p, key, *op)).collect();
            for (p, (_, _, o, v)) in pending.into_iter().zip(ops) {
                r.register_done(p, *o, *v);
            }
        } else {
            for (p, op, o, v) in ops {
                let pending = r.register_invoke(*p, key, *op);
                r.register_done(pending, *o, *v);
            }
        }
        linearizable(r.register_histories().remove(&key).unwrap_or_default())
    }

    use Outcome::*;
    use RegisterOp::*;

    #[test]
    fn a_stale_read_after_a_write_is_caught() {
        let h = [(0, Write(1), Ok, None), (1, Write(2), Ok, None), (2, Read(None), Ok, Some(1))];
        assert!(!run(&h, false), "reading 1 after 2 was acknowledged must be rejected");
        assert!(run(&h, true), "the same operations, all concurrent, are linearizable");
    }

    #[test]
    fn an_unknown_write_may_or_may_not_have_happened() {
        let applied = [(0, Write(1), Ok, None), (1, Write(2), Unknown, None), (2, Read(None), Ok, Some(2))];
        assert!(run(&applied, false));
        let not_applied = [(0, Write(1), Ok, None), (1, Write(2), Unknown, None), (2, Read(None), Ok, Some(1))];
        assert!(run(&not_applied, false));
        let never_written = [(0, Write(1), Ok, None), (2, Read(None), Ok, Some(3))];
        assert!(!run(&never_written, false));
    }

    #[test]
    fn compare_and_swap_results_are_checked() {
        let lost_swap = [(0, Write(1), Ok, None), (1, Cas(1, 2), Ok, None), (2, Read(None), Ok, Some(1))];
        assert!(!run(&lost_swap, false), "a swap acknowledged then not seen");
        let wrong_refusal = [(0, Write(1), Ok, None), (1, Cas(1, 2), Fail, None)];
        assert!(!run(&wrong_refusal, false), "a refused swap whose expectation held");
        let failed_read_ignored = [(0, Write(1), Ok, None), (1, Read(None), Fail, None), (2, Read(None), Ok, Some(1))];
        assert!(run(&failed_read_ignored, false));
    }
}
