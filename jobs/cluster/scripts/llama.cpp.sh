# ---- llama.cpp.sh: llama-server on one node, or split over NODES nodes with ggml-rpc-server ----------------
# Multi-node: srun starts ggml-rpc-server on nodes 2..N (this same script, mode rpc-worker); each writes its
# address to rpc-<rank>.addr in the session directory (shared home), and llama-server on the first node is
# started with --rpc host:port,... . Note that ggml-rpc-server has no authentication: it listens only while the
# job runs, on the cluster's internal network.

rpc_worker() {
  local addr port
  addr="$(node_addr)"
  port="$(free_port "$addr")"
  printf '%s:%s\n' "$addr" "$port" >"$SESSION_DIR/.rpc-$SLURM_PROCID.addr"
  mv -f "$SESSION_DIR/.rpc-$SLURM_PROCID.addr" "$SESSION_DIR/rpc-$SLURM_PROCID.addr"
  log "ggml-rpc-server on ${SLURMD_NODENAME:-$(hostname -s)} at $addr:$port"
  exec "$RPC_BIN" -H "$addr" -p "$port"
}

if [ "${1:-}" = rpc-worker ]; then
  load_modules
  rpc_worker
fi

start_traps
load_modules
ADDR="$(node_addr)"

RPC_ARGS=()
if [ "$NODES" -gt 1 ]; then
  rm -f "$SESSION_DIR"/rpc-*.addr
  log "starting ggml-rpc-server on $((NODES - 1)) more node(s)"
  srun --nodes=$((NODES - 1)) --ntasks=$((NODES - 1)) --ntasks-per-node=1 --relative=1 --kill-on-bad-exit=1 \
    bash "$SESSION_DIR/job.sh" rpc-worker &
  SRUN_PID=$!
  CHILDREN+=("$SRUN_PID")
  deadline=$((SECONDS + 120))
  while :; do
    shopt -s nullglob
    files=("$SESSION_DIR"/rpc-*.addr)
    shopt -u nullglob
    [ "${#files[@]}" -ge $((NODES - 1)) ] && break
    kill -0 "$SRUN_PID" 2>/dev/null || fail "$(server_error "ggml-rpc-server did not start on the other nodes")"
    [ "$SECONDS" -lt "$deadline" ] || fail "ggml-rpc-server did not report its address within 120s"
    sleep 1
  done
  RPC_LIST=""
  for f in "${files[@]}"; do
    endpoint="$(cat "$f")"
    [[ "$endpoint" =~ ^[A-Za-z0-9.:-]+:[0-9]+$ ]] || fail "bad RPC endpoint '$endpoint' in $f"
    until port_open "${endpoint%:*}" "${endpoint##*:}"; do
      kill -0 "$SRUN_PID" 2>/dev/null || fail "$(server_error "ggml-rpc-server at $endpoint stopped")"
      [ "$SECONDS" -lt "$deadline" ] || fail "ggml-rpc-server at $endpoint does not accept connections"
      sleep 1
    done
    RPC_LIST="${RPC_LIST:+$RPC_LIST,}$endpoint"
  done
  RPC_ARGS=(--rpc "$RPC_LIST")
fi

PORT="$(free_port "$ADDR")"
# -c is the whole KV cache, split evenly over the slots: each request gets CONTEXT tokens.
log "starting llama-server on $ADDR:$PORT (model $MODEL_PATH, $PARALLEL slot(s) of $CONTEXT tokens)"
"$SERVER_BIN" "${DEFAULT_FLAGS[@]}" -m "$MODEL_PATH" -a "$SERVED_NAME" -c "$((CONTEXT * PARALLEL))" -ngl "$GPU_LAYERS" \
  --parallel "$PARALLEL" --host "$ADDR" --port "$PORT" --api-key-file "$SESSION_DIR/api_key" --no-webui \
  "${RPC_ARGS[@]}" "${EXTRA_FLAGS[@]}" &
SERVER_PID=$!
CHILDREN+=("$SERVER_PID")
# /health answers 503 while the model loads and 200 once it is loaded.
wait_ready "$SERVER_PID" "$ADDR" "$PORT" /health
write_connection "$ADDR" "$PORT"
serve_until_end "$SERVER_PID"
