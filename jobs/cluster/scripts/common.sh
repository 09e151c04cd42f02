# ---- common.sh: shared by every runtime's job script (rendered after the quoted values above) ----------------
# The session directory holds: job.sh (this script), api_key (0600), job.log (Slurm output), connection.json
# (written only once the server answers its health check with the model loaded), error (why it stopped).
set -uo pipefail
umask 077
SESSION_DIR="$HOME/.hpc-llm-portal/sessions/$SESSION_ID"
cd "$SESSION_DIR" || exit 1
CHILDREN=()
CLEANUP_PATHS=() # node-local files of this run, removed when it stops
# The batch script runs with no argument; srun starts this same script on the job's other nodes as `rpc-worker`
# (llama.cpp over nodes) or `replica` (a batch launch's further servers), which leave the session's files alone.
JOB_MODE="${1:-}"
RESTARTS="${SLURM_RESTART_COUNT:-0}"
if [ -z "$JOB_MODE" ]; then
  # A run that ended without its trap (its node failed) may have left its address behind: never offer it again.
  rm -f "$SESSION_DIR/connection.json" "$SESSION_DIR"/replica-*.addr
fi
if [ -z "$JOB_MODE" ] && [ "$RESTARTS" -gt 0 ]; then
  # Started again after a requeue (preempted, or a node failed). A new key, so whatever answers at the old address
  # never learns the one the portal uses from now on; connection.json hands it to the portal.
  printf 'sk-hpcllm-%s' "$(head -c 48 /dev/urandom | base64 | tr -dc 'A-Za-z0-9' | cut -c 1-43)" >"$SESSION_DIR/.api_key.new"
  chmod 600 "$SESSION_DIR/.api_key.new" && mv -f "$SESSION_DIR/.api_key.new" "$SESSION_DIR/api_key" || exit 1
fi

log() { printf '[%s] portal: %s\n' "$(date '+%F %T')" "$*"; }

# Record why the session stops (the portal shows it as the end reason), then exit non-zero so Slurm says FAILED.
fail() {
  log "error: $*"
  [ -n "$JOB_MODE" ] || printf '%s\n' "$*" >"$SESSION_DIR/error"
  exit 1
}

cleanup() {
  local rc=$?
  trap - EXIT TERM INT HUP
  [ -n "$JOB_MODE" ] || rm -f "$SESSION_DIR/connection.json"
  local pid
  for pid in "${CHILDREN[@]}"; do kill -TERM "$pid" 2>/dev/null; done
  for _ in $(seq 20); do
    local alive=0
    for pid in "${CHILDREN[@]}"; do kill -0 "$pid" 2>/dev/null && alive=1; done
    [ "$alive" = 0 ] && break
    sleep 0.5
  done
  for pid in "${CHILDREN[@]}"; do kill -KILL "$pid" 2>/dev/null; done
  [ "${#CLEANUP_PATHS[@]}" -eq 0 ] || rm -rf "${CLEANUP_PATHS[@]}"
  stage_release
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

# The address Slurm uses for this node (NodeAddr): what the login host and the portal can reach.
node_addr() {
  local node="${SLURMD_NODENAME:-$(hostname -s)}" addr
  addr="$(scontrol show node "$node" 2>/dev/null | sed -n 's/.*NodeAddr=\([^ ]*\).*/\1/p' | head -n 1)"
  [ -n "$addr" ] || addr="$(hostname -f 2>/dev/null || hostname)"
  [[ "$addr" =~ ^[A-Za-z0-9][A-Za-z0-9.:-]*$ ]] || fail "unexpected node address '$addr'"
  printf '%s\n' "$addr"
}

port_open() { # HOST PORT: something accepts connections there
  timeout 2 bash -c 'exec 3<>"/dev/tcp/$0/$1"' "$1" "$2" 2>/dev/null
}

# HOST: a port that nothing on HOST listens on, below the kernel's ephemeral range: a port that only an outgoing
# connection holds looks free to port_open, and a server could not bind it (seen under a batch run's many requests).
free_port() {
  local port low=32768 high span
  read -r low high 2>/dev/null </proc/sys/net/ipv4/ip_local_port_range || true
  span=$((low - 10000))
  [ "$span" -ge 1000 ] || span=22768 low=32768
  for _ in $(seq 100); do
    port=$((10000 + RANDOM % span))
    port_open "$1" "$port" || { printf '%s\n' "$port"; return 0; }
  done
  fail "found no free port on $1"
}

# METHOD HOST PORT PATH [BODY] [TIMEOUT_S]: print the HTTP status code, 000 when nothing answers. Plain bash, so
# compute nodes need neither curl nor python for the health check.
http_status() {
  local method=$1 host=$2 port=$3 path=$4 body=${5:-} wait_s=${6:-10} code=000
  if { exec 3<>"/dev/tcp/$host/$port"; } 2>/dev/null; then
    printf '%s %s HTTP/1.0\r\nHost: %s:%s\r\nContent-Type: application/json\r\nContent-Length: %d\r\n\r\n%s' \
      "$method" "$path" "$host" "$port" "${#body}" "$body" >&3
    IFS=' ' read -r -t "$wait_s" _ code _ <&3 || code=000
    exec 3<&- 3>&-
  fi
  printf '%s\n' "${code:-000}"
}

# PID HOST PORT PATH: wait until the server answers 200 on PATH; fail with its last log lines if it exits first.
wait_ready() {
  local pid=$1 host=$2 port=$3 path=$4 deadline=$((SECONDS + READY_TIMEOUT_S))
  while [ "$SECONDS" -lt "$deadline" ]; do
    if ! kill -0 "$pid" 2>/dev/null; then
      wait "$pid"
      fail "$(server_error "the server exited with code $? before it was ready")"
    fi
    [ "$(http_status GET "$host" "$port" "$path")" = 200 ] && return 0
    sleep 2
  done
  fail "the server was not ready after ${READY_TIMEOUT_S}s"
}

# The server's own words about what went wrong: error-looking lines from the end of the log, else the last lines.
server_error() {
  local lines
  lines="$(tail -n 200 "$SESSION_DIR/job.log" 2>/dev/null | grep -v ' portal: ' |
    grep -iE 'error|fail|cannot|unable|no such|not found|denied|invalid|exception' | tail -n 4)"
  [ -n "$lines" ] || lines="$(tail -n 200 "$SESSION_DIR/job.log" 2>/dev/null | grep -v ' portal: ' | tail -n 4)"
  printf '%s: %s\n' "$1" "$(printf '%s' "$lines" | tr '\n' ' ' | cut -c 1-900)"
}

# HOST PORT: tell the portal where the server is. Written atomically, 0600, and only after the health check. A
# replica tells the batch runner on the first node instead (replica-<rank>.addr).
write_connection() {
  local tmp="$SESSION_DIR/.connection.json.tmp" key=""
  SERVED_AT="$1:$2"
  if [ "$JOB_MODE" = replica ]; then
    printf '%s:%s\n' "$1" "$2" >"$SESSION_DIR/.replica-$SLURM_PROCID.addr"
    mv -f "$SESSION_DIR/.replica-$SLURM_PROCID.addr" "$SESSION_DIR/replica-$SLURM_PROCID.addr"
    log "replica $SLURM_PROCID ready at $1:$2"
    return 0
  fi
  # After a restart the key is new (see above); the first run's is the one the portal staged.
  [ "$RESTARTS" -gt 0 ] && key="$(cat "$SESSION_DIR/api_key")"
  printf '{"host": "%s", "port": %d, "node": "%s", "job_id": "%s", "restarts": %d, "key": "%s"}\n' \
    "$1" "$2" "${SLURMD_NODENAME:-$(hostname -s)}" "${SLURM_JOB_ID:-}" "$RESTARTS" "$key" >"$tmp"
  chmod 0600 "$tmp"
  mv -f "$tmp" "$SESSION_DIR/connection.json"
  SERVED_AT="$1:$2"
  log "ready at $1:$2"
}

# SERVER_PID ARRAY_NAME: a batch launch's further replicas: this same script as `replica` on the job's other nodes,
# each with a server of its own; their addresses are added to the named array as --server arguments. The run starts
# once all have reported or READY_TIMEOUT_S has passed (with those that did); a replica that dies later only means
# fewer servers: the runner sends its prompts to the others.
start_replicas() {
  local server_pid=$1 others=$((REPLICAS - 1)) deadline=$((SECONDS + READY_TIMEOUT_S)) files f endpoint
  local -n into=$2
  log "starting $others more replica(s) of the server on the job's other nodes"
  srun --nodes="$others" --ntasks="$others" --ntasks-per-node=1 --relative=1 bash "$SESSION_DIR/job.sh" replica &
  CHILDREN+=("$!")
  while :; do
    shopt -s nullglob
    files=("$SESSION_DIR"/replica-*.addr)
    shopt -u nullglob
    [ "${#files[@]}" -ge "$others" ] && break
    kill -0 "$server_pid" 2>/dev/null || return 0
    [ "$SECONDS" -lt "$deadline" ] || { log "only ${#files[@]} of $others replicas are ready: going on with them"; break; }
    sleep 2
  done
  for f in "${files[@]}"; do
    endpoint="$(cat "$f")"
    [[ "$endpoint" =~ ^[A-Za-z0-9.:-]+:[0-9]+$ ]] || { log "ignoring a bad replica address in $f"; continue; }
    into+=(--server "http://$endpoint")
  done
}

# SERVER_PID: a batch launch's work (docs/batch.md): batchrun.py sends the run's requests to the server and records
# each answer once; the job ends when it is done. A runner that dies (killed, out of memory) is started again, up to
# BATCH_RESTARTS times, and goes on where it stopped; so does the job after a requeue.
BATCH_RESTARTS=5
run_batch() {
  local server_pid=$1 dir="$SESSION_DIR/batch/$BATCH_RUN" runner rc starts=0
  [ -f "$dir/requests.jsonl" ] || fail "the batch run's requests are missing ($dir/requests.jsonl)"
  local servers=(--server "http://$SERVED_AT")
  [ "${REPLICAS:-1}" -le 1 ] || start_replicas "$server_pid" servers
  log "batch run $BATCH_RUN: $(wc -l <"$dir/requests.jsonl") requests, $BATCH_CONCURRENCY at a time on each of $((${#servers[@]} / 2)) server(s)"
  while :; do
    python3 "$SESSION_DIR/batchrun.py" --requests "$dir/requests.jsonl" --results "$dir/results.jsonl" \
      --progress "$dir/progress.json" --output "$dir/output.jsonl" "${servers[@]}" \
      --key-file "$SESSION_DIR/api_key" --model "$SERVED_NAME" --concurrency "$BATCH_CONCURRENCY" &
    runner=$!
    CHILDREN+=("$runner")
    starts=$((starts + 1))
    # Whichever ends first (portable: `wait -n PID...` needs bash 5.1): the runner, or the server (it crashed).
    while kill -0 "$runner" 2>/dev/null && kill -0 "$server_pid" 2>/dev/null; do sleep 1; done
    if kill -0 "$runner" 2>/dev/null; then
      wait "$server_pid"
      fail "$(server_error "the server stopped with code $? during the batch run; what it answered is kept")"
    fi
    wait "$runner"
    rc=$?
    if [ "$rc" = 0 ]; then
      log "batch run $BATCH_RUN finished"
      rm -f "$SESSION_DIR/connection.json"
      exit 0
    fi
    [ "$starts" -le "$BATCH_RESTARTS" ] || fail "the batch runner stopped with code $rc, $starts times; what it answered is kept"
    log "the batch runner stopped with code $rc; starting it again ($starts of $BATCH_RESTARTS restarts)"
  done
}

# Wait for the server (or any child) to end; its exit code becomes the job's.
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

# ---- staging: the model's files copied to node-local storage before the server starts ---------------------------
# STAGE_TO is the job's $TMPDIR (resolved here, on the node), /dev/shm or a path the admin named. Copies live in
# <STAGE_TO>/hpc-llm-portal-<user>/<key>/ where the key hashes the source's path and each file's size and
# modification time, so a changed source is copied afresh and an unchanged one is reused. A job using a copy holds
# a shared flock on <key>.lock for its whole life (its server inherits the descriptor); making a copy holds it
# exclusively, so two jobs of the user on one node never copy the same model twice at once. With STAGE_KEEP=1 the
# copy stays for the next session; copies no job holds are removed oldest first when space runs short. With 0 the
# copy goes when the job stops, unless another job still uses it. Staging never stops a session: whatever goes
# wrong (no space, a failed copy), the server loads the model from where it lives and the log says why.
STAGE_FD="" STAGE_DROP="" STAGE_PARTIAL=""

# STATE BYTES TOTAL SECONDS FROM TO: staging.json for the portal's progress line (the first node's only).
stage_report() {
  [ -z "$JOB_MODE" ] || return 0
  printf '{"state": "%s", "bytes": %d, "total": %d, "seconds": %d, "from": "%s", "to": "%s"}\n' \
    "$1" "$2" "$3" "$4" "$5" "$6" >"$SESSION_DIR/.staging.json.tmp" &&
    mv -f "$SESSION_DIR/.staging.json.tmp" "$SESSION_DIR/staging.json"
}

# PATH: what makes up the model, one "name<TAB>bytes<TAB>mtime" line per file, names relative to its directory: a
# directory's files, or a GGUF with its other split parts (name-00001-of-00003.gguf ...).
stage_manifest() {
  if [ -d "$1" ]; then
    (cd "$1" && find -L . -type f ! -path '*/.*' -printf '%P\t%s\t%T@\n' | LC_ALL=C sort)
  elif [[ "$1" =~ ^(.*)-[0-9]{5}-of-([0-9]{5})\.gguf$ ]]; then
    find -L "${BASH_REMATCH[1]}"-[0-9][0-9][0-9][0-9][0-9]-of-"${BASH_REMATCH[2]}".gguf -maxdepth 0 -type f \
      -printf '%f\t%s\t%T@\n' | LC_ALL=C sort
  else
    find -L "$1" -maxdepth 0 -type f -printf '%f\t%s\t%T@\n'
  fi
}

# ROOT BYTES: room for BYTES (and 5 % more, at least 64 MiB) in ROOT, removing the user's oldest copies no job holds.
stage_make_room() {
  local root=$1 need=$(($2 + $2 / 20 + 67108864)) dir
  stage_free "$root" "$need" && return 0
  for dir in $(ls -1dtr "$root"/*/ 2>/dev/null); do
    dir=${dir%/}
    # A .partial is a copy being made under its key's exclusive lock, or one whose job died: free if the lock is.
    { flock -n -x 8 && rm -rf "$dir" && log "staging: removed the unused copy $dir to make room"; } 8>>"${dir%.partial}.lock"
    stage_free "$root" "$need" && return 0
  done
  return 1
}

stage_free() { # DIR BYTES: at least BYTES are free there
  local kib
  kib=$(df -Pk "$1" 2>/dev/null | awk 'NR == 2 { print $4 }')
  [ -n "$kib" ] && [ "$((kib * 1024))" -ge "$2" ]
}

# Copy MODEL_PATH to node-local storage (or reuse the copy there) and point MODEL_PATH at the copy.
stage_model() {
  [ -n "${STAGE_TO:-}" ] || return 0
  local base src=$MODEL_PATH manifest total key root dest name started cpid bytes rate
  if [ "$STAGE_TO" = '$TMPDIR' ]; then base=${TMPDIR:-}; else base=$STAGE_TO; fi
  name=$(basename "$src")
  if ! [[ "$base" =~ ^/[A-Za-z0-9_.+@/-]*$ ]]; then
    log "staging: no usable node-local directory (${STAGE_TO} is '${base}'): loading $src where it is"
    stage_report skipped 0 0 0 "$src" ""
    return 0
  fi
  [ -e "$src" ] || fail "cannot find the model $src on $(hostname -s)"
  manifest=$(stage_manifest "$src")
  [ -n "$manifest" ] || fail "the model $src has no files to load"
  total=$(printf '%s\n' "$manifest" | awk -F'\t' '{ s += $2 } END { printf "%d", s }')
  key=$(printf '%s\n%s\n' "$src" "$manifest" | sha256sum | cut -c 1-20)
  root="$base/hpc-llm-portal-$(id -un)"
  dest="$root/$key"
  if ! { mkdir -p "$root" && chmod 700 "$root" && exec {STAGE_FD}>>"$dest.lock"; } 2>/dev/null; then
    log "staging: cannot write in $base on $(hostname -s): loading $src where it is"
    stage_report skipped 0 "$total" 0 "$src" ""
    STAGE_FD=""
    return 0
  fi
  if [ -f "$dest/.complete" ]; then
    log "staging: reusing the copy in $dest (same files, sizes and modification times as $src)"
  else
    flock -x "$STAGE_FD"
    if [ -f "$dest/.complete" ]; then
      log "staging: another job of yours made the copy in $dest meanwhile: reusing it"
    else
      rm -rf "$dest" "$dest.partial"
      if ! stage_make_room "$root" "$total"; then
        log "staging: not enough space in $base on $(hostname -s) for $((total / 1048576)) MiB: loading $src where it is"
        stage_report skipped 0 "$total" 0 "$src" ""
        stage_release
        return 0
      fi
      log "staging: copying $((total / 1048576)) MiB from $src to $dest"
      started=$SECONDS
      STAGE_PARTIAL="$dest.partial"
      mkdir -p "$dest.partial"
      if [ -d "$src" ]; then
        cp -rL "$src/." "$dest.partial/$name/" &
      else
        (cd "$(dirname "$src")" && exec cp -L $(printf '%s\n' "$manifest" | cut -f 1) "$dest.partial/") &
      fi
      cpid=$!
      CHILDREN+=("$cpid")
      while kill -0 "$cpid" 2>/dev/null; do
        bytes=$(du -sb "$dest.partial" 2>/dev/null | cut -f 1)
        stage_report copying "${bytes:-0}" "$total" $((SECONDS - started)) "$src" "$dest"
        sleep 1
      done
      if ! wait "$cpid" || [ "$(du -sb "$dest.partial" | cut -f 1)" -lt "$total" ]; then
        rm -rf "$dest.partial"
        log "staging: the copy to $dest failed: loading $src where it is"
        stage_report skipped 0 "$total" $((SECONDS - started)) "$src" ""
        stage_release
        return 0
      fi
      : >"$dest.partial/.complete"
      mv "$dest.partial" "$dest" || fail "cannot move the staged copy into $dest"
      STAGE_PARTIAL=""
      rate=$((total / 1048576 / (SECONDS - started > 0 ? SECONDS - started : 1)))
      log "staging: copied $((total / 1048576)) MiB in $((SECONDS - started)) s ($rate MiB/s)"
    fi
  fi
  flock -s "$STAGE_FD"
  touch "$dest"  # the newest copy is the last one removed for room
  [ "${STAGE_KEEP:-1}" = 1 ] || STAGE_DROP=$dest
  stage_report "$([ -n "${started:-}" ] && echo copied || echo reused)" "$total" "$total" \
    $((SECONDS - ${started:-$SECONDS})) "$src" "$dest"
  MODEL_PATH="$dest/$name"
}

# When the job stops: let go of the copy; without STAGE_KEEP remove it, unless another job still holds it.
stage_release() {
  [ -z "$STAGE_PARTIAL" ] || rm -rf "$STAGE_PARTIAL"
  STAGE_PARTIAL=""
  [ -n "$STAGE_FD" ] || return 0
  if [ -n "$STAGE_DROP" ] && flock -n -x "$STAGE_FD"; then
    rm -rf "$STAGE_DROP" "$STAGE_DROP.lock"
    log "staging: removed the copy $STAGE_DROP"
  fi
  exec {STAGE_FD}>&-
  STAGE_FD="" STAGE_DROP=""
}

# LABEL NAME: a server of a model directory on one node, on a Unix socket ($SOCKET, NAME.sock) in the private run
# directory, which only keyproxy.py (serve_behind_key_proxy) reaches.
one_node_on_private_socket() {
  [ -e "$MODEL_PATH" ] || fail "cannot find the model directory $MODEL_PATH on $(hostname -s)"
  [ "$NODES" -eq 1 ] || fail "$1 runs on a single node in the portal"
  stage_model
  private_run_dir
  SOCKET="$RUN_DIR/$2.sock"
}

# SERVER_PID --upstream-socket PATH | --upstream-port PORT, HEALTH_PATH: keyproxy.py on the node's address in front
# of a server that must not be reached without the key; ready once the server's own HEALTH_PATH answers 200 through
# it; then serve until the server ends.
serve_behind_key_proxy() {
  local server_pid=$1 upstream_option=$2 upstream=$3 health_path=$4 addr port proxy_pid
  addr="$(node_addr)"
  port="$(free_port "$addr")"
  python3 "$SESSION_DIR/keyproxy.py" --listen "$addr" --port "$port" "$upstream_option" "$upstream" \
    --health-path "$health_path" --key-file "$SESSION_DIR/api_key" &
  proxy_pid=$!
  CHILDREN+=("$proxy_pid")
  wait_ready "$server_pid" "$addr" "$port" /health
  kill -0 "$proxy_pid" 2>/dev/null || fail "the key proxy stopped"
  write_connection "$addr" "$port"
  serve_until_end "$server_pid"
}

# Runs on a running session (docs/batch.md): the portal stages a run under batch/<run>/ (requests.jsonl, then a
# `start` mark) and the job starts its runner beside the server; a `stop` mark stops it. A runner that died before
# its run was done starts again, up to BATCH_RESTARTS times; after that the run's `error` file says why.
declare -A RUNNERS=() RUNNER_STARTS=()
supervise_batches() {
  local dir run pid rc
  for dir in "$SESSION_DIR"/batch/*; do
    run=${dir##*/}
    [ -f "$dir/start" ] && [ -f "$dir/requests.jsonl" ] || continue
    pid=${RUNNERS[$run]:-}
    if [ -n "$pid" ] && kill -0 "$pid" 2>/dev/null; then
      [ -f "$dir/stop" ] && kill -TERM "$pid" 2>/dev/null
      continue
    fi
    if [ -n "$pid" ]; then
      wait "$pid"
      rc=$?
      unset "RUNNERS[$run]"
      [ "$rc" = 0 ] || [ -f "$dir/stop" ] || log "the runner of batch run $run stopped with code $rc"
    fi
    [ -f "$dir/stop" ] || [ -f "$dir/output.jsonl" ] || [ -f "$dir/error" ] && continue
    RUNNER_STARTS[$run]=$((${RUNNER_STARTS[$run]:-0} + 1))
    if [ "${RUNNER_STARTS[$run]}" -gt $((BATCH_RESTARTS + 1)) ]; then
      printf 'its runner stopped %s times; see the job log\n' "$BATCH_RESTARTS" >"$dir/error"
      continue
    fi
    log "starting the runner of batch run $run ($(wc -l <"$dir/requests.jsonl") requests)"
    python3 "$SESSION_DIR/batchrun.py" --requests "$dir/requests.jsonl" --results "$dir/results.jsonl" \
      --progress "$dir/progress.json" --output "$dir/output.jsonl" --server "http://$SERVED_AT" \
      --key-file "$SESSION_DIR/api_key" --model "$SERVED_NAME" --concurrency "$(cat "$dir/concurrency" 2>/dev/null || echo 1)" &
    RUNNERS[$run]=$!
    CHILDREN+=("$!")
  done
}

serve_until_end() {
  local pid=$1 rc
  if [ "$JOB_MODE" = replica ]; then
    wait "$pid"
    exit $?
  fi
  [ -z "${BATCH_RUN:-}" ] || run_batch "$pid"
  while kill -0 "$pid" 2>/dev/null; do
    supervise_batches
    sleep 2
  done
  wait "$pid"
  rc=$?
  rm -f "$SESSION_DIR/connection.json"
  [ "$rc" = 0 ] || fail "$(server_error "the server stopped with code $rc")"
  log "the server exited"
  exit 0
}

