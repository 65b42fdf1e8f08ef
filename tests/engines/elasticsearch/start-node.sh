#!/usr/bin/env bash
# start-node: one real Elasticsearch node for ferry's tests.
#
# This is the template of target/VERSION/start-node: ../build-elasticsearch
# prepends the lines that set `version`, `dist` (the unpacked integ-test-zip
# distribution, with root-shim installed) and `java_home`.
#
# Usage:  target/VERSION/start-node --home DIR [--ignore-stdin]
#
# Contract with the Rust test kit (the same as FerryNode's for OpenSearch):
#   - One single-node cluster ("ferry-test") whose HTTP and transport bind to
#     127.0.0.1 on ports the OS picks (port 0), so nodes can run side by side,
#     each with its own DIR. DIR holds everything the node writes: config (a
#     copy of the distribution's, ES_PATH_CONF), data, logs, tmp. Security is
#     off, disk thresholds are off, wildcard deletes are allowed. JVM: 512 MB
#     heap, C1 only and no heap pre-touch (halves start-up, 8.19 on 2 busy
#     cores: 37 -> 19 s; RSS -220 MB); ES_JAVA_OPTS from the environment is
#     appended, so it can override those (-XX:TieredStopAtLevel=4 for the
#     full JIT, -XX:+AlwaysPreTouch, -Xms/-Xmx).
#   - Run as root, the node runs as uid/gid 65534 (Elasticsearch refuses root)
#     and DIR is chowned to it; otherwise it runs as the caller.
#   - When GET / answers 200 and cluster health is at least yellow, exactly one
#     line goes to stdout:  {"url":"http://127.0.0.1:PORT","version":"X.Y.Z"}
#     Nothing else is ever written to stdout; Elasticsearch's console output
#     goes to DIR/logs/console.log, this script's messages to stderr.
#   - When stdin reaches EOF (the parent died or closed the pipe), or on
#     SIGTERM/SIGINT/SIGHUP, the node is stopped (SIGTERM to its JVMs, SIGKILL
#     to those left after 8 s; a clean stop takes under a second) and the
#     script exits: 0 after EOF, 128+signal after a signal. EOF before the node
#     is ready stops it too (exit 1). --ignore-stdin turns the EOF watch off,
#     for manual runs (stop those with Ctrl-C).
#   - If this script is SIGKILLed, the kernel signals its children (parent-death
#     signal, set with setpriv): the launcher JVM is killed and the stdin
#     watcher kills the node's other JVMs, so no Elasticsearch process
#     outlives it.
#   - Bad arguments exit 2. A node that fails to start, dies, or is not ready
#     within 180 s exits 1 with the tail of its console log on stderr.
#
# Processes: this script; the launcher JVM (bin/elasticsearch execs it; it
# starts the server JVM, waits for it and stops it on SIGTERM; 9.x adds a
# short-lived CLI JVM in between while starting); the server JVM (its pid in
# DIR/es.pid); the stdin watcher (this script again, with --watch-stdin). The
# JVMs are told apart from other nodes' by -Des.path.conf=DIR/config or
# -Djava.io.tmpdir=DIR/tmp on their command lines.
set -uo pipefail

: "${version:?use the start-node that build-elasticsearch writes}"
: "${dist:?}" "${java_home:?}"

startup_timeout=180 # seconds until the node must be ready
stop_grace=8        # seconds between SIGTERM and SIGKILL (the test kit waits 10)
nobody=65534

alive() { # $1 is a live process (not gone, not a zombie)
    local state=""
    [ -r "/proc/$1/stat" ] && read -r _ _ state _ <"/proc/$1/stat" 2>/dev/null
    [ -n "$state" ] && [ "$state" != Z ]
}
node_jvms() { # the JVMs of the node in DIR $1, whoever their parent is now: those
    # with -Des.path.conf=DIR/config (launchers) or -Djava.io.tmpdir=DIR/tmp (server)
    local f pid comm
    for f in $(grep -lsF -e "-Des.path.conf=$1/config" -e "-Djava.io.tmpdir=$1/tmp" /proc/[0-9]*/cmdline); do
        pid="${f#/proc/}" pid="${pid%/cmdline}"
        read -r comm 2>/dev/null <"/proc/$pid/comm" && [ "$comm" = java ] && alive "$pid" \
            && { tr '\0' '\n' <"$f"; } 2>/dev/null \
                | grep -xF -e "-Des.path.conf=$1/config" -e "-Djava.io.tmpdir=$1/tmp" >/dev/null \
            && echo "$pid"
    done
}

# Prefixes that make the kernel signal a child when this script dies (a plain
# command, so that bash execs it in the forked child: a function or subshell
# in between would be the parent instead).
deathsig_kill=() deathsig_term=()
if command -v setpriv >/dev/null 2>&1; then
    deathsig_kill=(setpriv --pdeathsig KILL)
    deathsig_term=(setpriv --pdeathsig TERM)
fi

# The stdin watcher (internal): exits at EOF on stdin. On SIGTERM (from the
# kernel when start-node died, or from start-node once the node is stopped) it
# SIGKILLs the JVMs of DIR still there, if any.
if [ "${1:-}" = --watch-stdin ]; then
    home="$2"
    exec 3<&0 </dev/null
    "${deathsig_kill[@]}" cat <&3 >/dev/null 2>&1 &
    cat=$!
    exec 3<&-
    trap '' INT HUP
    trap 'kill "$cat" 2>/dev/null; pids="$(node_jvms "$home")"; [ -z "$pids" ] || kill -KILL $pids 2>/dev/null; exit 0' TERM
    wait "$cat"
    exit 0
fi

usage() {
    echo "usage: start-node --home DIR [--ignore-stdin]" >&2
    exit 2
}
home=""
watch_stdin=1
while [ $# -gt 0 ]; do
    case "$1" in
        --ignore-stdin) watch_stdin=""; shift ;;
        --home) [ $# -ge 2 ] || usage; home="$2"; shift 2 ;;
        --home=*) home="${1#--home=}"; shift ;;
        *) usage ;;
    esac
done
[ -n "$home" ] || usage
command -v curl >/dev/null 2>&1 || { echo "start-node: needs curl" >&2; exit 1; }

# fd 3 is the parent's stdin, only for the watcher; everything else reads /dev/null.
exec 3<&0 </dev/null

say() { echo "start-node: Elasticsearch $version: $*" >&2; }

mkdir -p "$home" && home="$(cd "$home" && pwd)" || exit 1
conf="$home/config" data="$home/data" logs="$home/logs" tmp="$home/tmp"
rm -rf "$conf" && cp -R "$dist/config" "$conf" && mkdir -p "$data" "$logs" "$tmp" || exit 1
# The JVM writes GC logs, crash files and heap dumps to its working directory,
# the (shared, read-only) distribution: no GC log, the rest into DIR/logs.
sed -i '/^-Xlog:gc/d' "$conf/jvm.options"
printf '%s\n' "-XX:ErrorFile=$logs/hs_err_pid%p.log" "-XX:HeapDumpPath=$logs" \
    > "$conf/jvm.options.d/ferry.options"

# The launcher JVM, in the foreground (pid $es), killed by the kernel if this
# script dies. As root, setpriv also drops to nobody; it sets the parent-death
# signal after the uid change (which would clear it).
launch=("${deathsig_kill[@]}")
if [ "$(id -u)" = 0 ]; then
    command -v setpriv >/dev/null 2>&1 || { say "running as root needs setpriv (util-linux)"; exit 1; }
    chown -R "$nobody:$nobody" "$home" || exit 1
    launch=(setpriv --reuid="$nobody" --regid="$nobody" --clear-groups --pdeathsig KILL)
fi
"${launch[@]}" env -i PATH=/usr/bin:/bin HOME="$home" LANG=C.UTF-8 \
    ES_JAVA_HOME="$java_home" ES_PATH_CONF="$conf" ES_TMPDIR="$tmp" \
    ES_JAVA_OPTS="-Xms512m -Xmx512m -XX:TieredStopAtLevel=1 -XX:-AlwaysPreTouch ${ES_JAVA_OPTS:-}" \
    "$dist/bin/elasticsearch" -p "$home/es.pid" \
    -E cluster.name=ferry-test \
    -E node.name=ferry-test \
    -E discovery.type=single-node \
    -E network.host=127.0.0.1 \
    -E http.port=0 \
    -E transport.port=0 \
    -E node.portsfile=true \
    -E path.data="$data" \
    -E path.logs="$logs" \
    -E xpack.security.enabled=false \
    -E cluster.routing.allocation.disk.threshold_enabled=false \
    -E action.destructive_requires_name=false \
    3<&- >>"$logs/console.log" 2>&1 &
es=$!

watcher=""
if [ -n "$watch_stdin" ]; then
    "${deathsig_term[@]}" "${BASH_SOURCE[0]}" --watch-stdin "$home" <&3 >/dev/null 2>&1 &
    watcher=$!
fi
exec 3<&-

node_pids() { # the launcher if alive, and every JVM of the node
    alive "$es" && echo "$es"
    node_jvms "$home"
}
stopped=""
stop() { # stops the node (idempotent) and the watcher
    [ -n "$stopped" ] && return
    stopped=1
    trap '' TERM INT HUP
    local pids p i signalled=" "
    # The launcher stops the server when told to; the server also stops on
    # its own SIGTERM (which counts while it is still starting). A JVM that
    # shows up meanwhile (started by a launcher) is told too.
    for ((i = 0; i < stop_grace * 10; i++)); do
        pids="$(node_pids)"
        [ -n "$pids" ] || break
        for p in $pids; do
            case "$signalled" in
                *" $p "*) ;;
                *) kill -TERM "$p" 2>/dev/null; signalled+="$p " ;;
            esac
        done
        sleep 0.1
    done
    pids="$(node_pids)"
    [ -z "$pids" ] || kill -KILL $pids 2>/dev/null
    wait "$es" 2>/dev/null
    if [ -n "$watcher" ]; then
        kill "$watcher" 2>/dev/null
        wait "$watcher" 2>/dev/null
    fi
}
fail() {
    say "$*; last lines of $logs/console.log:"
    stop
    tail -n 40 "$logs/console.log" >&2
    exit 1
}
trap 'stop; exit 143' TERM
trap 'stop; exit 130' INT
trap 'stop; exit 129' HUP
trap stop EXIT

# Ready: the HTTP port is known (node.portsfile writes DIR/logs/http.ports),
# GET / answers 200 and the cluster is at least yellow.
deadline=$((SECONDS + startup_timeout))
url=""
while :; do
    alive "$es" || fail "the node exited during start-up"
    [ -z "$watcher" ] || alive "$watcher" || fail "stdin closed during start-up"
    if [ -z "$url" ] && [ -s "$logs/http.ports" ]; then
        addr="$(head -n 1 "$logs/http.ports")"
        url="http://127.0.0.1:${addr##*:}"
    fi
    if [ -n "$url" ] && curl -fsS -m 5 -o /dev/null "$url/" 2>/dev/null \
        && curl -fsS -m 15 -o /dev/null \
            "$url/_cluster/health?wait_for_status=yellow&timeout=10s" 2>/dev/null; then
        break
    fi
    [ "$SECONDS" -lt "$deadline" ] || fail "not ready within $startup_timeout s"
    sleep 0.25
done
printf '{"url":"%s","version":"%s"}\n' "$url" "$version"

# Run until stdin closes (or a signal arrives, see the traps).
wait -n $watcher "$es"
if ! alive "$es"; then
    wait "$es"
    say "the node exited by itself (status $?); last lines of $logs/console.log:"
    stop
    tail -n 40 "$logs/console.log" >&2
    exit 1
fi
stop
exit 0
