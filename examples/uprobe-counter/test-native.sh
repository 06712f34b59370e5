#!/bin/bash
# Native (kernel) check of uprobe-counter. Needs root.
#   ./test-native.sh [BUILD_DIR] [ROUNDS]
# Builds into BUILD_DIR (default: a temp dir), then checks exact counts for
# each victim mode, the -p (uprobe pid filter + .rodata) and -P (.rodata only)
# filters, -d, SIGINT, and a failing attach.
set -u
cd "$(dirname "$0")"
B=${1:-$(mktemp -d /tmp/uprobe-counter.XXXXXX)}
ROUNDS=${2:-5}
T=$(mktemp -d /tmp/uprobe-counter-test.XXXXXX)
fail=0
make -s BUILD="$B" >/dev/null || { echo "FAIL: build"; exit 1; }
UC="$B/uprobe-counter"; V="$B/victim"

# start_counter OUTFILE ARGS... ; sets CPID; waits for "attached"
start_counter() {
	local out=$1; shift
	"$UC" "$@" >"$out" 2>"$out.err" &
	CPID=$!
	for _ in $(seq 200); do
		grep -qx attached "$out" && return 0
		kill -0 $CPID 2>/dev/null || break
		sleep 0.05
	done
	echo "FAIL: counter did not attach ($*)"; cat "$out.err"; fail=1; return 1
}
# start_victim NAME ARGS... ; waits on $T/go.NAME; sets VPID
start_victim() {
	local name=$1; shift
	"$V" -W "$T/go.$name" "$@" >"$T/victim.$name" &
	VPID=$!
	for _ in $(seq 200); do grep -q '^pid ' "$T/victim.$name" && return 0; sleep 0.01; done
	echo "FAIL: victim $name did not start"; fail=1
}
check() { # name expected actual
	if [ "$2" == "$3" ]; then echo "ok   $1"; else
		echo "FAIL $1"; echo "--- expected"; echo "$2"; echo "--- got"; echo "$3"; fail=1; fi
}

# 1. exact counts, every victim mode, several rounds
for mode in target nop5 lea; do
	fn=$mode; [ $mode = target ] && fn=target_function; [ $mode = nop5 ] && fn=nop5_entry
	[ $mode = lea ] && fn=lea_entry
	for r in $(seq "$ROUNDS"); do
		start_counter "$T/c" -n 1000 "$V" "$fn" || continue
		"$V" -m $mode 1000 >/dev/null & vp=$!; wait $vp
		wait $CPID; rc=$?
		check "exact/$mode/round$r (rc=$rc)" \
			"$(printf 'attached\npid %d calls 1000\ntotal_calls 1000\narg_sum 499500' $vp)" \
			"$(cat "$T/c")"
	done
done

# 2. ARG_BASE
start_counter "$T/c" -n 10 "$V" target_function && {
	"$V" 10 100 >/dev/null & vp=$!; wait $vp; wait $CPID
	check "arg_base" "$(printf 'attached\npid %d calls 10\ntotal_calls 10\narg_sum 1045' $vp)" "$(cat "$T/c")"; }

# 3. two processes, no filter: both counted, sorted by pid
start_victim a 300; pa=$VPID; start_victim b 700; pb=$VPID
start_counter "$T/c" -n 1000 "$V" target_function && {
	touch "$T/go.a" "$T/go.b"; wait $pa $pb; wait $CPID
	exp=$( (echo "pid $pa calls 300"; echo "pid $pb calls 700") | sort -n -k2)
	check "two pids, unfiltered" \
		"$(printf 'attached\n%s\ntotal_calls 1000\narg_sum %d' "$exp" $((299*300/2 + 699*700/2)))" \
		"$(cat "$T/c")"; }
rm -f "$T"/go.*

# 4. -p PID (uprobe pid filter + .rodata) and 5. -P PID (.rodata only)
for flag in -p -P; do
	start_victim other 500; po=$VPID; start_victim tgt 1000; pt=$VPID
	start_counter "$T/c" $flag $pt -n 1000 "$V" target_function && {
		touch "$T/go.other"; wait $po     # the other process runs first, fully
		touch "$T/go.tgt"; wait $pt; wait $CPID
		check "filter $flag (other pid $po ignored)" \
			"$(printf 'attached\npid %d calls 1000\ntotal_calls 1000\narg_sum 499500' $pt)" \
			"$(cat "$T/c")"; }
	rm -f "$T"/go.*
done

# 6. -d SECONDS
start_counter "$T/c" -d 1 "$V" target_function && {
	"$V" 42 >/dev/null & vp=$!; wait $vp; wait $CPID; rc=$?
	check "-d 1 (rc=$rc)" "$(printf 'attached\npid %d calls 42\ntotal_calls 42\narg_sum 861' $vp)" "$(cat "$T/c")"; }

# 7. SIGINT with no -d/-n
start_counter "$T/c" "$V" target_function && {
	"$V" 5 >/dev/null & vp=$!; wait $vp; kill -INT $CPID; wait $CPID; rc=$?
	check "SIGINT (rc=$rc)" "$(printf 'attached\npid %d calls 5\ntotal_calls 5\narg_sum 10' $vp)" "$(cat "$T/c")"; }

# 8. failure: unknown function -> non-zero exit, libbpf error on stderr
"$UC" -n 1 "$V" no_such_function >"$T/c" 2>"$T/c.err"; rc=$?
if [ $rc -ne 0 ] && [ -s "$T/c.err" ] && ! grep -q attached "$T/c"; then echo "ok   bad function (rc=$rc)"; sed 's/^/     /' "$T/c.err"
else echo "FAIL bad function rc=$rc"; cat "$T/c" "$T/c.err"; fail=1; fi

rm -rf "$T"
[ $fail = 0 ] && echo "ALL OK" || echo "SOME TESTS FAILED"
exit $fail
