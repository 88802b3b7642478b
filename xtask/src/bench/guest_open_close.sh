#!/bin/bash
# open+close inside a job (FILE, default a watched credential): agent off, agent with the fast
# file-open hooks (--hooks fast), agent with the tracepoint set (--hooks tracepoint); interleaved
# rounds, nanoseconds per open+close. `cargo xtask bench --only guest` runs it in the 6.1 and 6.12
# guests (xtask/src/bench/guest.rs); by hand, after `cargo xtask bench` or `cargo xtask test
# --kernel 6.12` (which build the release binaries):
#   cargo xtask guest 6.12 env FILE=/tmp/rmb/home/notes.txt bash xtask/src/bench/guest_open_close.sh
D=/tmp/rmb; rm -rf $D; mkdir -p $D/home/.aws; echo '[default]' > $D/home/.aws/credentials
cp /bin/sh $D/Runner.Worker
R=$(cd "$(dirname "$0")/../../../target/release" && pwd)
N=${N:-20000}; ROUNDS=${ROUNDS:-5}
FILE=${FILE:-$D/home/.aws/credentials}
echo plain > $D/home/notes.txt
measure() { (cd $D && ./Runner.Worker -c "exec $R/bench-workload open $FILE $N"); }
agent() {
  rm -rf $D/state $D/spool $D/log; 
  $R/runner-monitor run --listen 127.0.0.1:19477 --alerts-out $D/alerts --control-socket $D/control.sock \
    --spool-dir $D/spool --fresh-state --state-dir $D/state --pin-dir /sys/fs/bpf/rmb --hooks $1 2> $D/log >/dev/null &
  AGENT=$!
  for i in $(seq 600); do grep -q "control socket ready" $D/log 2>/dev/null && break; sleep 0.1; done
  grep -o "file opens hooks=[a-z_ ]*" $D/log | head -1 >&2
}
stop() { kill -TERM $AGENT; wait $AGENT; }
for r in $(seq $ROUNDS); do
  off=$(measure)
  agent fast; fast=$(measure); stop
  agent tracepoint; tp=$(measure); stop
  echo "round $r off $off fast $fast tracepoint $tp"
done
