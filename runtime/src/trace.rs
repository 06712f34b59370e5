//! Where `bpf_trace_printk` output goes. The kernel writes it to the tracefs `trace_pipe`; we
//! hand each line to a sink the embedding process chooses (the agent must never write to its
//! target's stdout or stderr unless asked). Default: a `tracing` event at info level with
//! target `bpf_trace_printk`.

use parking_lot::RwLock;

type Sink = Box<dyn Fn(&str) + Send + Sync>;

static SINK: RwLock<Option<Sink>> = RwLock::new(None);

/// Routes trace lines to `sink`.
pub fn set_sink(sink: impl Fn(&str) + Send + Sync + 'static) {
    *SINK.write() = Some(Box::new(sink));
}

/// Emits one trace line.
pub fn emit(line: &str) {
    match &*SINK.read() {
        Some(s) => s(line),
        None => tracing::info!(target: "bpf_trace_printk", "{line}"),
    }
}
