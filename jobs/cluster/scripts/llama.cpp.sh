# ---- llama.cpp.sh: llama-server on one node, or split over NODES nodes with ggml-rpc-server ----------------
# Multi-node: srun starts ggml-rpc-server on nodes 2..N (this same script, mode rpc-worker). ggml-rpc-server has no
# authentication and serves one client, so it listens on its node's loopback only (the job holds its nodes with
# --exclusive=user) behind rpcrelay.py, which lets a connection through only after a challenge-response proving it
# holds this run's RPC key ($RPC_KEY_FILE, 0600 in the session directory, new for every run). Each worker writes
# its relay's address to $RPC_ADDR_PREFIX<rank>$ADDR_SUFFIX (shared home); llama-server on the first node reaches them through a local
# rpcrelay.py connect, with --rpc 127.0.0.1:port,... . docs/security.md explains the choice.

rpc_worker() {
  local addr port inner pids=()
  trap 'kill "${pids[@]}" 2>/dev/null; exit 143' TERM INT HUP
  addr="$(node_addr)"
  inner="$(free_port 127.0.0.1)"
  "$RPC_BIN" -H 127.0.0.1 -p "$inner" &
  pids+=("$!")
  until port_open 127.0.0.1 "$inner"; do
    kill -0 "${pids[0]}" 2>/dev/null || exit 1
    sleep 0.5
  done
  port="$(free_port "$addr")"
  python3 "$SESSION_DIR/rpcrelay.py" serve --listen "$addr" --port "$port" --upstream-port "$inner" \
    --key-file "$SESSION_DIR/$RPC_KEY_FILE" &
  pids+=("$!")
  until port_open "$addr" "$port"; do
    kill -0 "${pids[1]}" 2>/dev/null || exit 1
    sleep 0.5
  done
  write_atomically "$SESSION_DIR/$RPC_ADDR_PREFIX$SLURM_PROCID$ADDR_SUFFIX" "$addr:$port"
  log "ggml-rpc-server on ${SLURMD_NODENAME:-$(hostname -s)} at 127.0.0.1:$inner, its relay at $addr:$port"
  wait -n  # (bash 4.3 has no "wait -n PID...")
  kill "${pids[@]}" 2>/dev/null
  exit 1
}

if [ "${1:-}" = rpc-worker ]; then
  load_modules
  rpc_worker
fi

start_traps
load_modules
# Only this node reads the GGUF (ggml-rpc-server receives its tensors over the network): the one place to stage it.
stage_model
ADDR="$(node_addr)"

RPC_ARGS=()
if [ "$NODES" -gt 1 ]; then
  rm -f "$SESSION_DIR/$RPC_ADDR_PREFIX"*"$ADDR_SUFFIX"
  head -c 32 /dev/urandom | od -An -tx1 | tr -d ' \n' >"$SESSION_DIR/$RPC_KEY_FILE" || fail "cannot write the RPC key"
  log "starting ggml-rpc-server on $((NODES - 1)) more node(s)"
  srun --nodes=$((NODES - 1)) --ntasks=$((NODES - 1)) --ntasks-per-node=1 --relative=1 --kill-on-bad-exit=1 \
    bash "$SESSION_DIR/$JOB_SCRIPT" rpc-worker &
  SRUN_PID=$!
  CHILDREN+=("$SRUN_PID")
  deadline=$((SECONDS + 120))
  while :; do
    shopt -s nullglob
    files=("$SESSION_DIR/$RPC_ADDR_PREFIX"*"$ADDR_SUFFIX")
    shopt -u nullglob
    [ "${#files[@]}" -ge $((NODES - 1)) ] && break
    kill -0 "$SRUN_PID" 2>/dev/null || fail "$(server_error "ggml-rpc-server did not start on the other nodes")"
    [ "$SECONDS" -lt "$deadline" ] || fail "ggml-rpc-server did not report its address within 120s"
    sleep 1
  done
  RPC_LIST="" MAPS=() LOCAL_PORTS=()
  for f in "${files[@]}"; do
    endpoint="$(cat "$f")"
    [[ "$endpoint" =~ ^[A-Za-z0-9.:-]+:[0-9]+$ ]] || fail "bad RPC endpoint '$endpoint' in $f"
    until port_open "${endpoint%:*}" "${endpoint##*:}"; do
      kill -0 "$SRUN_PID" 2>/dev/null || fail "$(server_error "ggml-rpc-server at $endpoint stopped")"
      [ "$SECONDS" -lt "$deadline" ] || fail "ggml-rpc-server at $endpoint does not accept connections"
      sleep 1
    done
    local_port="$(free_port 127.0.0.1)"
    while [[ " ${LOCAL_PORTS[*]} " == *" $local_port "* ]]; do local_port="$(free_port 127.0.0.1)"; done
    LOCAL_PORTS+=("$local_port")
    MAPS+=(--map "$local_port=$endpoint")
    RPC_LIST="${RPC_LIST:+$RPC_LIST,}127.0.0.1:$local_port"
  done
  python3 "$SESSION_DIR/rpcrelay.py" connect "${MAPS[@]}" --key-file "$SESSION_DIR/$RPC_KEY_FILE" &
  RELAY_PID=$!
  CHILDREN+=("$RELAY_PID")
  for local_port in "${LOCAL_PORTS[@]}"; do
    until port_open 127.0.0.1 "$local_port"; do
      kill -0 "$RELAY_PID" 2>/dev/null || fail "$(server_error "the RPC relay stopped")"
      [ "$SECONDS" -lt "$deadline" ] || fail "the RPC relay did not start within 120s"
      sleep 0.5
    done
  done
  RPC_ARGS=(--rpc "$RPC_LIST")
fi

PORT="$(free_port "$ADDR")"
# -c is the whole KV cache, split evenly over the slots: each request gets CONTEXT tokens.
# An embeddings session answers /v1/embeddings, pooled by the mean unless the cluster's flags name another pooling
# (after these, so they win): a chat model's GGUF names none, and llama-server refuses unpooled embeddings.
# A chat session applies the model's own Jinja chat template, which carries its tool-call format: without --jinja
# llama-server refuses any request with tools. The llama.cpp the portal pins (llama-cpp-python 0.3.36) has it on by
# default, a site's older build may not; the runtime's and the cluster's flags come after, so they can say --no-jinja.
TASK_FLAGS=(--jinja)
[ "${EMBEDDINGS:-0}" = 1 ] && TASK_FLAGS=(--embeddings --pooling mean)
# Its buffer sizes (weights, KV, compute per device), which the portal reads from this log as the session's measured
# figures (jobs/cluster/measured.py), print at verbosity 4 in builds since late 2025; older builds print them anyway
# and ignore the variable. A -lv among the cluster's flags still wins.
export LLAMA_ARG_LOG_VERBOSITY="${LLAMA_ARG_LOG_VERBOSITY:-4}"
lora_args llama.cpp
log "starting llama-server on $ADDR:$PORT (model $MODEL_PATH, $PARALLEL slot(s) of $CONTEXT tokens)"
"$SERVER_BIN" "${TASK_FLAGS[@]}" "${DEFAULT_FLAGS[@]}" -m "$MODEL_PATH" -a "$SERVED_NAME" -c "$((CONTEXT * PARALLEL))" -ngl "$GPU_LAYERS" \
  --parallel "$PARALLEL" --host "$ADDR" --port "$PORT" --api-key-file "$SESSION_DIR/$API_KEY_FILE" --no-webui \
  "${RPC_ARGS[@]}" "${LORA_ARGS[@]}" "${EXTRA_FLAGS[@]}" &
SERVER_PID=$!
CHILDREN+=("$SERVER_PID")
# /health answers 503 while the model loads and 200 once it is loaded.
wait_ready "$SERVER_PID" "$ADDR" "$PORT" /health
write_connection "$ADDR" "$PORT"
serve_until_end "$SERVER_PID"
