# ---- skeleton.sh: every job's frame (after the layout's names and the session's quoted values above) ------------
# The session directory holds $JOB_SCRIPT (this script), $API_KEY_FILE (0600), $JOB_LOG (Slurm's output),
# $CONNECTION_FILE (written only once the server answers its health check with the model loaded) and $ERROR_FILE
# (why it stopped). The other parts (server.sh, keyproxy.sh, staging.sh, batch.sh) only define functions; the
# runtime's own script, last, calls them.
set -uo pipefail
umask 077
SESSION_DIR="$SESSIONS_DIR/$SESSION_ID"
cd "$SESSION_DIR" || exit 1
CHILDREN=()      # processes stopped (TERM, then KILL) when the job stops
CLEANUP_PATHS=() # node-local files of this run, removed when it stops
ON_EXIT=()       # functions the other parts run when the job stops (staging lets go of its copy)
# The batch script runs with no argument; srun starts this same script on the job's other nodes as `rpc-worker`
# (llama.cpp over nodes) or `replica` (a batch launch's further servers), which leave the session's files alone.
JOB_MODE="${1:-}"
RESTARTS="${SLURM_RESTART_COUNT:-0}"
if [ -z "$JOB_MODE" ]; then
  # A run that ended without its trap (its node failed) may have left its address behind: never offer it again.
  rm -f "$SESSION_DIR/$CONNECTION_FILE" "$SESSION_DIR/$REPLICA_ADDR_PREFIX"*"$ADDR_SUFFIX"
fi
if [ -z "$JOB_MODE" ] && [ "$RESTARTS" -gt 0 ]; then
  # Started again after a requeue (preempted, or a node failed). A new key, so whatever answers at the old address
  # never learns the one the portal uses from now on; $CONNECTION_FILE hands it to the portal.
  printf 'sk-hpcllm-%s' "$(head -c 48 /dev/urandom | base64 | tr -dc 'A-Za-z0-9' | cut -c 1-43)" \
    >"$SESSION_DIR/.$API_KEY_FILE.new"
  chmod 600 "$SESSION_DIR/.$API_KEY_FILE.new" && mv -f "$SESSION_DIR/.$API_KEY_FILE.new" "$SESSION_DIR/$API_KEY_FILE" ||
    exit 1
fi

log() { printf '[%s] portal: %s\n' "$(date '+%F %T')" "$*"; }

# FILE TEXT: write FILE whole or not at all (a reader on the login host never sees half of it), 0600.
write_atomically() {
  local tmp
  tmp="$(dirname "$1")/.$(basename "$1").tmp"
  printf '%s\n' "$2" >"$tmp" && chmod 0600 "$tmp" && mv -f "$tmp" "$1"
}

# Record why the session stops (the portal shows it as the end reason), then exit non-zero so Slurm says FAILED.
fail() {
  log "error: $*"
  [ -n "$JOB_MODE" ] || write_atomically "$SESSION_DIR/$ERROR_FILE" "$*"
  exit 1
}

cleanup() {
  local rc=$? pid hook alive
  trap - EXIT TERM INT HUP
  [ -n "$JOB_MODE" ] || rm -f "$SESSION_DIR/$CONNECTION_FILE"
  for pid in "${CHILDREN[@]}"; do kill -TERM "$pid" 2>/dev/null; done
  for _ in $(seq 20); do
    alive=0
    for pid in "${CHILDREN[@]}"; do kill -0 "$pid" 2>/dev/null && alive=1; done
    [ "$alive" = 0 ] && break
    sleep 0.5
  done
  for pid in "${CHILDREN[@]}"; do kill -KILL "$pid" 2>/dev/null; done
  [ "${#CLEANUP_PATHS[@]}" -eq 0 ] || rm -rf "${CLEANUP_PATHS[@]}"
  for hook in "${ON_EXIT[@]}"; do "$hook"; done
  log "stopped (exit $rc)"
  exit "$rc"
}

start_traps() {
  trap cleanup EXIT
  trap 'log "signal received, stopping"; exit 143' TERM INT HUP
}

load_modules() {
  [ "${#MODULES[@]}" -gt 0 ] || return 0
  # Batch shells are not login shells; Lmod/Environment Modules define `module` in the profile.
  type module >/dev/null 2>&1 || source /etc/profile >/dev/null 2>&1 || true
  type module >/dev/null 2>&1 || fail "the module command is not available on $(hostname) (needed for: ${MODULES[*]})"
  module load "${MODULES[@]}" || fail "module load ${MODULES[*]} failed"
}

# A node-local directory only this user can open (0700), removed when the run stops, in $RUN_DIR: for a server's
# Unix socket (at most 107 bytes of path, and shared filesystems may not hold sockets), and for the temporary files,
# IPC sockets and caches of Python servers, which otherwise land in a /tmp or ~/.cache that other jobs share. A
# cache the site's module points elsewhere stays there. The model is a path on the cluster: nothing is fetched.
private_run_dir() {
  RUN_DIR="$(mktemp -d "${TMPDIR:-/tmp}/hpcllm.XXXXXXXX")" || fail "cannot make a private directory in ${TMPDIR:-/tmp}"
  CLEANUP_PATHS+=("$RUN_DIR")
  mkdir -p "$RUN_DIR/tmp" "$RUN_DIR/hf/hub" || fail "cannot write in $RUN_DIR"
  export TMPDIR="$RUN_DIR/tmp" HF_HOME="$RUN_DIR/hf" HF_HUB_OFFLINE=1
  export XDG_CACHE_HOME="${XDG_CACHE_HOME:-$RUN_DIR/cache}"
  export VLLM_CACHE_ROOT="${VLLM_CACHE_ROOT:-$XDG_CACHE_HOME/vllm}"
  export TORCHINDUCTOR_CACHE_DIR="${TORCHINDUCTOR_CACHE_DIR:-$XDG_CACHE_HOME/torchinductor}"
}
