# ---- server.sh: the model server's address, port, health and end; telling the portal where it is ----------------

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
    sleep 0.5 # a loaded model is offered within half a second (a health check is one cheap request)
  done
  fail "the server was not ready after ${READY_TIMEOUT_S}s"
}

# The server's own words about what went wrong: error-looking lines from the end of the log, else the last lines.
server_error() {
  local lines
  lines="$(tail -n 200 "$SESSION_DIR/$JOB_LOG" 2>/dev/null | grep -v ' portal: ' |
    grep -iE 'error|fail|cannot|unable|no such|not found|denied|invalid|exception' | tail -n 4)"
  [ -n "$lines" ] || lines="$(tail -n 200 "$SESSION_DIR/$JOB_LOG" 2>/dev/null | grep -v ' portal: ' | tail -n 4)"
  printf '%s: %s\n' "$1" "$(printf '%s' "$lines" | tr '\n' ' ' | cut -c 1-900)"
}

# HOST PORT: tell the portal where the server is, only after the health check. A replica tells the batch runner on
# the first node instead ($REPLICA_ADDR_PREFIX<rank>$ADDR_SUFFIX).
write_connection() {
  local key=""
  SERVED_AT="$1:$2"
  if [ "$JOB_MODE" = replica ]; then
    write_atomically "$SESSION_DIR/$REPLICA_ADDR_PREFIX$SLURM_PROCID$ADDR_SUFFIX" "$1:$2"
    log "replica $SLURM_PROCID ready at $1:$2"
    return 0
  fi
  # After a restart the key is new (skeleton.sh); the first run's is the one the portal staged.
  [ "$RESTARTS" -gt 0 ] && key="$(cat "$SESSION_DIR/$API_KEY_FILE")"
  write_atomically "$SESSION_DIR/$CONNECTION_FILE" "$(printf \
    '{"host": "%s", "port": %d, "node": "%s", "job_id": "%s", "restarts": %d, "key": "%s"}' \
    "$1" "$2" "${SLURMD_NODENAME:-$(hostname -s)}" "${SLURM_JOB_ID:-}" "$RESTARTS" "$key")"
  log "ready at $1:$2"
  log_gpu_memory
}

# The job's GPUs' used memory once the model is loaded, one figure a GPU, for the portal's measured figures
# (jobs/cluster/measured.py reads this line from the log); nothing without nvidia-smi.
log_gpu_memory() {
  local used
  command -v nvidia-smi >/dev/null 2>&1 && [ -n "${CUDA_VISIBLE_DEVICES:-}" ] || return 0
  used="$(timeout 10 nvidia-smi -i "$CUDA_VISIBLE_DEVICES" --query-gpu=memory.used --format=csv,noheader,nounits \
    2>/dev/null | tr -d ' ' | paste -sd, - | sed 's/,/, /g')"
  [[ "$used" =~ ^[0-9]+(,\ [0-9]+)*$ ]] && log "nvidia-smi memory.used MiB: $used"
  return 0
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

# SERVER_PID: serve until the server ends; its exit code becomes the job's. A batch launch works through its run
# first and ends the job with it; a session takes batch runs while it serves (batch.sh).
serve_until_end() {
  local pid=$1 rc
  if [ "$JOB_MODE" = replica ]; then
    wait "$pid"
    exit $?
  fi
  [ -z "${BATCH_RUN:-}" ] || run_batch "$pid"
  while kill -0 "$pid" 2>/dev/null; do
    supervise_batches
    sleep 1
  done
  wait "$pid"
  rc=$?
  rm -f "$SESSION_DIR/$CONNECTION_FILE"
  [ "$rc" = 0 ] || fail "$(server_error "the server stopped with code $rc")"
  log "the server exited"
  exit 0
}

# RUNTIME: LORA_ARGS, the flags that load the fine-tune runs' adapters ($ADAPTER_RUNS, their directories beside this
# one in $SESSIONS_DIR, or for those in $COPIED_ADAPTERS the portal's copy in $ADAPTERS_DIR): llama.cpp each run's
# GGUF at scale 0, the base weights, unless a request's `lora` field applies it (the proxy sends one with every
# request: a slot keeps its last); vLLM each PEFT directory as a LoRA module named by the run's uuid.
lora_args() {
  local run dir copied
  LORA_ARGS=()
  [ -n "${ADAPTER_RUNS[*]:-}" ] || return 0
  for run in "${ADAPTER_RUNS[@]}"; do
    [[ "$run" =~ ^[0-9a-f]{8}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{12}$ ]] || fail "bad adapter run '$run'"
    dir="$SESSIONS_DIR/$run"
    for copied in "${COPIED_ADAPTERS[@]:-}"; do
      [ "$copied" != "$run" ] || dir="$ADAPTERS_DIR/$run"
    done
    case "$1" in
      llama.cpp)
        [ -f "$dir/$ADAPTER_GGUF" ] || fail "the adapter of fine-tune run $run has no GGUF for llama.cpp ($dir)"
        LORA_ARGS+=(--lora-scaled "$dir/$ADAPTER_GGUF:0") ;;
      vllm)
        [ -f "$dir/$ADAPTER_DIR/adapter_config.json" ] || fail "fine-tune run $run has no adapter in $dir"
        LORA_ARGS+=(--lora-modules "$run=$dir/$ADAPTER_DIR") ;;
    esac
  done
  [ "$1" != vllm ] ||
    LORA_ARGS=(--enable-lora --max-lora-rank "$MAX_LORA_RANK" --max-loras "${#ADAPTER_RUNS[@]}" "${LORA_ARGS[@]}")
  log "loading ${#ADAPTER_RUNS[@]} LoRA adapter(s): ${ADAPTER_RUNS[*]}"
}
