#!/usr/bin/python3
# A custom bcc tool (BPF(text=...), attach_uprobe / attach_uretprobe, a hash map and a perf
# buffer), run by tests/e2e_bcc.rs both against the kernel and under `bpftime load`.
#
#   uprobe_ret.py BINARY SYMBOL N
#
# Prints "attached" once both probes and the perf buffer are in place, then reads N events (one
# per return of SYMBOL: its first argument and return value) from the perf buffer and prints
# the five with the smallest arguments, the totals and the entry counts by argument modulo 4,
# then exits. Gives up after 30 s without events (and says so), so a broken emulation fails
# the test instead of hanging it.
import sys
import time

from bcc import BPF

PROGRAM = r"""
#include <uapi/linux/ptrace.h>

struct event {
    u64 arg;
    s64 ret;
    u32 tid_matches;
};

BPF_HASH(args, u32, u64);
BPF_HASH(by_mod4, u64, u64);
BPF_PERF_OUTPUT(events);

int on_entry(struct pt_regs *ctx)
{
    u32 tid = bpf_get_current_pid_tgid();
    u64 arg = PT_REGS_PARM1(ctx);
    u64 key = arg % 4;

    args.update(&tid, &arg);
    by_mod4.atomic_increment(key);  // 8 threads: the kernel runs them on 2 CPUs at once
                                    // (keys created beforehand, see main())
    return 0;
}

int on_return(struct pt_regs *ctx)
{
    u64 id = bpf_get_current_pid_tgid();
    u32 tid = id;
    u64 *arg = args.lookup(&tid);
    struct event e = {};

    if (!arg)
        return 0;
    e.arg = *arg;
    e.ret = (int)PT_REGS_RC(ctx);
    e.tid_matches = (u32)(id >> 32) == tid;
    args.delete(&tid);
    events.perf_submit(ctx, &e, sizeof(e));
    return 0;
}
"""


def main():
    binary, symbol, want = sys.argv[1], sys.argv[2], int(sys.argv[3])
    b = BPF(text=PROGRAM)
    # bcc's atomic_increment inserts a missing key with BPF_NOEXIST after a failed lookup;
    # two threads racing on a key's first increment lose one (the insert that comes second
    # fails) — in the kernel too, where preemption is off and the window is narrower than in
    # userspace. Creating the keys first leaves only the atomic adds.
    for k in range(4):
        b["by_mod4"][b["by_mod4"].Key(k)] = b["by_mod4"].Leaf(0)
    b.attach_uprobe(name=binary, sym=symbol, fn_name="on_entry")
    b.attach_uretprobe(name=binary, sym=symbol, fn_name="on_return")

    seen = []
    lost = [0]

    def on_event(cpu, data, size):
        e = b["events"].event(data)
        seen.append((e.arg, e.ret, e.tid_matches))

    def on_lost(n):
        lost[0] += n

    b["events"].open_perf_buffer(on_event, page_cnt=256, lost_cb=on_lost)
    # Only now: an event output before the perf buffer is open is dropped without a trace.
    print("attached", flush=True)
    last = time.monotonic()
    while len(seen) + lost[0] < want:
        before = len(seen)
        b.perf_buffer_poll(timeout=200)
        if len(seen) != before:
            last = time.monotonic()
        elif time.monotonic() - last > 30:
            print("timeout: no events for 30 s")
            break

    # Events come through one buffer per CPU: their order across CPUs is not fixed.
    for arg, ret, _ in sorted(seen)[:5]:
        print("event arg=%d ret=%d" % (arg, ret))
    print("events %d lost %d" % (len(seen), lost[0]))
    print("arg_sum %d" % sum(a for a, _, _ in seen))
    print("ret_sum %d" % sum(r for _, r, _ in seen))
    print("main_thread_events %d" % sum(t for _, _, t in seen))
    for k, v in sorted((k.value, v.value) for k, v in b["by_mod4"].items()):
        print("entries arg%%4=%d: %d" % (k, v))


if __name__ == "__main__":
    main()
