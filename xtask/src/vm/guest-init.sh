#!/bin/busybox sh
# kml guest /init (written into the initramfs by `cargo xtask vm`).
#
# Kernel command line (set by xtask):
#   kml.mode=probe|smoke|full   what to run
#   kml.policy=P1,P2            verdict policies compared with stock (full mode): off, reads,
#                               reads-under-writes (kml-agent hook), model, model-reads
#                               (kml-agent run --model MODEL --act POLICY)
#   kml.model=MODEL             model for the model policies (a name in /kml/models)
#   kml.online=1                if set: the model policies learn online (retrain every 10 s, from 2,000 records)
#   kml.hold_out=N              with kml.online: the hook leaves 1 in N flagged requests alone (default 16)
#   kml.runtime=SECONDS         fio runtime per run (full mode; the job files read $KML_RUNTIME)
#   kml.seed=N                  fio's random seed (the job files read $KML_SEED; default 1234)
#   kml.boost_max=N             if set: mq-deadline's kml_boost_max on the test disk
#   kml.read_expire=MS          if set: mq-deadline's read_expire on the test disk (every run)
#   kml.workloads=a,b           if set: only these workloads (full mode)
#   kml.repeat=N                rounds per workload: stock and each policy once, the order
#                               rotating from round to round (full mode)
# In full mode every run is recorded by `kml-agent record` (observers only, the same in
# every run) into NAME.ARM.R.csv: the witness of each request's own deadline, and the
# training data of a VM model (NAME.stock.R.csv).
# Results go to the virtio-9p share `kmlout` (mounted at /mnt/out); the last line is
# `KML-VM-RESULT: PASS` or `KML-VM-RESULT: FAIL <reason>`; then the guest tells QEMU
# its result through isa-debug-exit (port 0xf4) and powers off.

/bin/busybox mkdir -p /proc /sys /dev /tmp /mnt/out /sbin /usr/bin /usr/sbin /run
/bin/busybox --install -s /bin
export PATH=/usr/bin:/bin:/usr/sbin:/sbin
[ -f /kml/env ] && . /kml/env
export HOME=/tmp

mount -t proc proc /proc
mount -t sysfs sysfs /sys
mount -t devtmpfs devtmpfs /dev 2>/dev/null
mount -t tmpfs tmpfs /tmp
mount -t tracefs tracefs /sys/kernel/tracing 2>/dev/null
mount -t debugfs debugfs /sys/kernel/debug 2>/dev/null

DISK=vda
Q=/sys/block/$DISK/queue
T=/sys/kernel/tracing
OUT=/mnt/out

arg() {
    for w in $(cat /proc/cmdline); do
        case "$w" in "$1"=*) echo "${w#*=}"; return ;; esac
    done
    echo "$2"
}

MODE=$(arg kml.mode smoke)
POLICIES=$(arg kml.policy reads-under-writes)
MODEL=$(arg kml.model logistic)
ONLINE=$(arg kml.online "")
HOLD_OUT=$(arg kml.hold_out 16)
export KML_RUNTIME=$(arg kml.runtime 30)
export KML_SEED=$(arg kml.seed 1234)
BOOST_MAX=$(arg kml.boost_max "")
READ_EXPIRE=$(arg kml.read_expire "")
WORKLOADS=$(arg kml.workloads "")
REPEAT=$(arg kml.repeat 1)

SHARED=0
finish() {
    # $1: PASS or FAIL, then the reason
    sync
    [ "$SHARED" = 1 ] && umount $OUT 2>/dev/null
    echo "KML-VM-RESULT: $*"
    # Let the serial port drain before QEMU is told to exit.
    sleep 1
    if [ "$1" = PASS ]; then code='\000'; else code='\001'; fi
    # isa-debug-exit: QEMU exits with status (code << 1) | 1
    printf "$code" | dd of=/dev/port bs=1 seek=244 count=1 2>/dev/null
    poweroff -f
    sleep 10
    echo o > /proc/sysrq-trigger
}
fail() { finish FAIL "$*"; }

echo "kml-guest: kernel $(uname -r), mode $MODE, $(nproc) CPUs"

if [ "$MODE" = probe ]; then
    echo "KML-VM-READY"
    finish PASS probe
fi

mount -t 9p -o trans=virtio,version=9p2000.L,msize=262144 kmlout $OUT || fail "cannot mount the 9p share kmlout"
SHARED=1

# ---------------------------------------------------------------- the disk
[ -b /dev/$DISK ] || fail "no /dev/$DISK"
echo mq-deadline > $Q/scheduler || fail "cannot select mq-deadline on $DISK"
echo 64 > $Q/nr_requests || fail "cannot set nr_requests 64 on $DISK"
# mq-deadline means async_depth = nr_requests, but 6.12 updates it before it stores
# the new nr_requests (it stays at the old 2 and holds writes in tag allocation,
# outside the scheduler): set it explicitly.
echo 64 > $Q/iosched/async_depth || fail "cannot set async_depth 64 on $DISK"
[ -f $Q/iosched/kml_boosts ] || fail "$Q/iosched/kml_boosts missing: not kml's patched mq-deadline"
if [ -n "$READ_EXPIRE" ]; then
    echo "$READ_EXPIRE" > $Q/iosched/read_expire || fail "cannot set read_expire"
fi
if [ -n "$BOOST_MAX" ]; then
    echo "$BOOST_MAX" > $Q/iosched/kml_boost_max || fail "cannot set kml_boost_max"
fi
grep -q dd_kml_verdict /proc/kallsyms || fail "dd_kml_verdict not in kallsyms"
{
    echo "kernel $(uname -r)"
    echo "cmdline $(cat /proc/cmdline)"
    echo "scheduler $(cat $Q/scheduler)"
    echo "nr_requests $(cat $Q/nr_requests)"
    echo "hw_queue_depth $(cat /sys/block/$DISK/mq/*/nr_tags 2>/dev/null | head -n1)"
    for f in $Q/iosched/*; do echo "iosched.$(basename $f) $(cat $f)"; done
    grep -c . /sys/kernel/debug/error_injection/list 2>/dev/null | sed 's/^/error_injection_functions /'
    grep dd_kml_verdict /sys/kernel/debug/error_injection/list 2>/dev/null | sed 's/^/error_injection /'
    dmesg | grep -i "kml\|mq-deadline" | sed 's/^/dmesg /'
} > $OUT/settings.txt
kml-agent doctor > $OUT/doctor.txt 2>&1
cat $OUT/doctor.txt

boosts() { echo "$(cat $Q/iosched/kml_boosts) $(cat $Q/iosched/kml_capped)"; }

# The agent runs with --json: its events (one JSON object a line: "ready" once
# attached, "end" with its counters) go to NAME.json, its messages to NAME.log.
# $1 pid, $2 the events file, $3 the log, $4 what is waited for.
wait_ready() {
    i=0
    while ! grep -q '"event":"ready"' "$2"; do
        kill -0 $1 2>/dev/null || fail "kml-agent exited before $4: $(tr '\n' ' ' < "$3")"
        i=$((i + 1))
        [ $i -gt 600 ] && fail "kml-agent did not get to $4 within 60 s"
        sleep 0.1
    done
}

HOOK_PID=
HOOK_VIA=
start_hook() {
    # $1 policy, $2 log file (NAME.log; events to NAME.json), $3 model (model policies),
    # $4 --retrain-every (model policies; default: 0, or 10s with kml.online)
    : > "$2"
    : > "${2%.log}.json"
    case "$1" in
    model | model-reads)
        # The observers, the model and the verdict program in one object; a fixed
        # model unless kml.online (online learning learns from outcomes the verdicts
        # changed).
        retrain=0
        [ -n "$ONLINE" ] && retrain=10s
        [ -n "$4" ] && retrain=$4
        # At 100 IOPS the default 20,000 records take 200 s: train from 2,000.
        kml-agent run --json --device $DISK --model "$3" --act "$1" --retrain-every $retrain \
            --min-train-records 2000 --hold-out $HOLD_OUT --ring-size 1M \
            > "${2%.log}.json" 2> "$2" &
        ;;
    *)
        if [ -n "$HOOK_VIA" ]; then
            kml-agent hook --json --policy "$1" $HOOK_VIA > "${2%.log}.json" 2> "$2" &
        else
            kml-agent hook --json --policy "$1" --device $DISK > "${2%.log}.json" 2> "$2" &
        fi
        ;;
    esac
    HOOK_PID=$!
    wait_ready $HOOK_PID "${2%.log}.json" "$2" "attaching the hook"
}
stop_hook() {
    kill -INT $HOOK_PID
    wait $HOOK_PID
    rc=$?
    HOOK_PID=
    [ $rc = 0 ] || fail "kml-agent hook exited with status $rc: $(tr '\n' ' ' < "$1")"
}

trace_start() {
    echo 0 > $T/tracing_on
    echo 16384 > $T/buffer_size_kb
    echo > $T/trace
    echo 1 > $T/events/block/block_rq_insert/enable
    echo 1 > $T/events/block/block_rq_issue/enable
    echo 1 > $T/tracing_on
}
trace_stop() {
    echo 0 > $T/tracing_on
    cat $T/trace > "$1"
    echo 0 > $T/events/block/block_rq_insert/enable
    echo 0 > $T/events/block/block_rq_issue/enable
    echo > $T/trace
}

# One fio run: $1 job file, $2 output name (JSON to $OUT/$2.json)
run_fio() {
    fio --output-format=json --output=$OUT/$2.json "$1" > $OUT/$2.fio-stderr 2>&1 ||
        fail "fio $2 failed: $(tail -n3 $OUT/$2.fio-stderr | tr '\n' ' ')"
}

# ---------------------------------------------------------------- smoke
if [ "$MODE" = smoke ]; then
    JOB=/kml/workloads/smoke.fio
    [ -f $JOB ] || fail "no $JOB"
    # Runs whose dispatch order is compared take 8 s; those that only count take 3.
    export KML_SMOKE_RUNTIME=8
    echo "kml-guest: smoke: stock run (no program attached)"
    b0=$(boosts)
    trace_start
    run_fio $JOB smoke.stock
    trace_stop $OUT/smoke.stock.trace
    b1=$(boosts)
    echo "kml-guest: smoke: hook run (policy reads)"
    start_hook reads /tmp/smoke.hook.agent.log
    trace_start
    run_fio $JOB smoke.hook
    trace_stop $OUT/smoke.hook.trace
    b2=$(boosts)
    stop_hook /tmp/smoke.hook.agent.log
    cp /tmp/smoke.hook.agent.log /tmp/smoke.hook.agent.json $OUT/
    cat /tmp/smoke.hook.agent.log
    echo "stock $b0 $b1" > $OUT/smoke.boosts
    echo "hook $b1 $b2" >> $OUT/smoke.boosts
    # The same verdicts through the other attach path, fmod_ret, under a cap of
    # one boost per direction per read_expire window.
    export KML_SMOKE_RUNTIME=3
    echo "kml-guest: smoke: fmod_ret run (policy reads, kml_boost_max 1)"
    cap_default=$(cat $Q/iosched/kml_boost_max)
    echo 1 > $Q/iosched/kml_boost_max || fail "cannot set kml_boost_max 1"
    HOOK_VIA="--via fmod-ret"
    start_hook reads /tmp/smoke.fmodret.agent.log
    HOOK_VIA=
    t0=$(cut -d' ' -f1 /proc/uptime)
    trace_start
    run_fio $JOB smoke.fmodret
    trace_stop $OUT/smoke.fmodret.trace
    b3=$(boosts)
    t1=$(cut -d' ' -f1 /proc/uptime)
    stop_hook /tmp/smoke.fmodret.agent.log
    echo "$cap_default" > $Q/iosched/kml_boost_max || fail "cannot restore kml_boost_max"
    cp /tmp/smoke.fmodret.agent.log /tmp/smoke.fmodret.agent.json $OUT/
    echo "hook $b2 $b3" > $OUT/smoke.fmodret.boosts
    echo "boost_max 1 read_expire_ms $(cat $Q/iosched/read_expire) uptime $t0 $t1" > $OUT/smoke.fmodret.cap
    # The fixed policies that must not boost: off (every call says no), and
    # reads-under-writes and reads-behind-writes with no write queued; then both
    # with writes.
    for run in off:smoke.fio:smoke.off reads-under-writes:smoke-reads.fio:smoke.rwalone reads-under-writes:smoke.fio:smoke.rw \
        reads-behind-writes:smoke-reads.fio:smoke.rbwalone reads-behind-writes:smoke.fio:smoke.rbw; do
        policy=${run%%:*}; rest=${run#*:}; job=/kml/workloads/${rest%%:*}; name=${rest#*:}
        echo "kml-guest: smoke: $name run (policy $policy, $(basename $job))"
        start_hook $policy /tmp/$name.agent.log
        bb=$(boosts)
        run_fio $job $name
        ba=$(boosts)
        stop_hook /tmp/$name.agent.log
        cp /tmp/$name.agent.log /tmp/$name.agent.json $OUT/
        echo "hook $bb $ba" > $OUT/$name.boosts
    done
    # The model path: observers + a model + the verdict program (kml-agent run
    # --act), with hand-set models whose verdicts are known: none at risk, all at risk.
    echo "kml-guest: smoke: model run, a model that flags no request"
    b3n=$(boosts)
    start_hook model-reads /tmp/smoke.never.agent.log smoke-never-at-risk
    run_fio $JOB smoke.never
    b4=$(boosts)
    stop_hook /tmp/smoke.never.agent.log
    cp /tmp/smoke.never.agent.log /tmp/smoke.never.agent.json $OUT/
    echo "hook $b3n $b4" > $OUT/smoke.never.boosts
    echo "kml-guest: smoke: model run, a model that flags every request (learning online: 1 in 16 held out)"
    export KML_SMOKE_RUNTIME=8
    # Online learning on (it never trains in 8 s): the hook holds requests out.
    start_hook model-reads /tmp/smoke.model.agent.log smoke-always-at-risk 1h
    trace_start
    run_fio $JOB smoke.model
    trace_stop $OUT/smoke.model.trace
    b5=$(boosts)
    stop_hook /tmp/smoke.model.agent.log
    cp /tmp/smoke.model.agent.log /tmp/smoke.model.agent.json $OUT/
    grep "kml-agent: hook" /tmp/smoke.model.agent.log
    echo "hook $b4 $b5" > $OUT/smoke.model.boosts
    set -- $b0 $b1 $b2 $b3 $b3n $b4 $b5
    stock_boosts=$(($3 - $1))
    hook_boosts=$(($5 - $3))
    hook_capped=$(($6 - $4))
    fmodret_boosts=$(($7 - $5))
    never_boosts=$((${11} - $9))
    model_boosts=$((${13} - ${11}))
    echo "kml-guest: smoke: kernel boosts: stock run $stock_boosts, kprobe run $hook_boosts (refused by the cap: $hook_capped), fmod_ret run $fmodret_boosts, model runs: never $never_boosts, always $model_boosts"
    [ $stock_boosts = 0 ] || fail "requests were boosted with no program attached ($stock_boosts)"
    [ $hook_boosts -gt 0 ] || fail "the kprobe hook run boosted no request (kml_boosts did not move)"
    [ $fmodret_boosts -gt 0 ] || fail "the fmod_ret run boosted no request (kml_boosts did not move)"
    [ $never_boosts = 0 ] || fail "a model that flags nothing got $never_boosts requests boosted"
    [ $model_boosts -gt 0 ] || fail "a model that flags every request got none boosted (kml_boosts did not move)"
    finish PASS "smoke: hook attached, $hook_boosts requests served early (kprobe), $fmodret_boosts (fmod_ret), $model_boosts (model at risk), $never_boosts (model never at risk)"
fi

# ---------------------------------------------------------------- full comparison
arm_run() {
    # $1 job, $2 workload name, $3 arm (stock or a policy), $4 round
    run=$2.$3.$4
    echo "kml-guest: $2: $3, round $4 (${KML_RUNTIME}s)"
    # The witness, the same in every run: observers only, no verdict program. Its
    # records carry each request's insert and dispatch jiffies (its own deadline).
    # It records until the run ends (SIGINT below), not for record's default 10 s.
    log=/tmp/$run.record.log
    kml-agent record --json --device $DISK --duration 1h --out /tmp/$run.csv > ${log%.log}.json 2> $log &
    rec=$!
    wait_ready $rec ${log%.log}.json $log "recording"
    [ "$3" = stock ] || start_hook $3 /tmp/$run.agent.log "$MODEL"
    b0=$(boosts)
    run_fio $1 $run
    b1=$(boosts)
    if [ "$3" != stock ]; then
        stop_hook /tmp/$run.agent.log
        cp /tmp/$run.agent.log /tmp/$run.agent.json $OUT/
        tail -n2 /tmp/$run.agent.log
    fi
    echo "$3 $b0 $b1" >> $OUT/$2.boosts
    kill -INT $rec
    wait $rec || fail "kml-agent record failed: $(tr '\n' ' ' < $log)"
    # Written to tmpfs first: 9p writes would slow the recorder.
    cp /tmp/$run.csv $log $OUT/ && rm /tmp/$run.csv
    tail -n1 $log
}
if [ "$MODE" = full ]; then
    ARMS="stock $(echo "$POLICIES" | tr ',' ' ')"
    K=$(echo $ARMS | wc -w)
    n=0
    for JOB in /kml/workloads/*.fio; do
        name=$(basename $JOB .fio)
        [ "$name" = smoke ] && continue
        if [ -n "$WORKLOADS" ]; then
            case ",$WORKLOADS," in *",$name,"*) ;; *) continue ;; esac
        fi
        n=$((n + 1))
        : > $OUT/$name.boosts
        r=1
        while [ $r -le $REPEAT ]; do
            # Each round runs every arm once; the order rotates by one each round, so
            # that over K rounds each arm runs once in each position (against drift).
            set -- $ARMS
            i=0
            while [ $i -lt $(((r - 1) % K)) ]; do
                first=$1
                shift
                set -- "$@" $first
                i=$((i + 1))
            done
            for arm in "$@"; do
                arm_run $JOB $name $arm $r
            done
            r=$((r + 1))
        done
    done
    [ $n -gt 0 ] || fail "no workload ran"
    finish PASS "full: $n workloads x $REPEAT rounds of: $ARMS"
fi

fail "unknown kml.mode=$MODE"
