# ---- vllm.sh: vllm serve, tensor parallel over the GPUs of a node, pipeline parallel across nodes ----------
# The API key reaches vLLM through VLLM_API_KEY (read from the 0600 file), never on its command line. Several
# nodes form a Ray cluster first (head here, workers through srun), as vLLM's multi-node guide describes.
start_traps
load_modules
[ -e "$MODEL_PATH" ] || fail "cannot find the model directory $MODEL_PATH on $(hostname -s)"
ADDR="$(node_addr)"
VLLM_API_KEY="$(cat "$SESSION_DIR/api_key")"
export VLLM_API_KEY

DIST_ARGS=()
if [ "$NODES" -gt 1 ]; then
  RAY_PORT="$(free_port "$ADDR")"
  log "starting a Ray head on $ADDR:$RAY_PORT and workers on $((NODES - 1)) more node(s)"
  ray start --head --node-ip-address="$ADDR" --port="$RAY_PORT" --block >/dev/null &
  CHILDREN+=("$!")
  sleep 10
  srun --nodes=$((NODES - 1)) --ntasks=$((NODES - 1)) --ntasks-per-node=1 --relative=1 \
    ray start --address="$ADDR:$RAY_PORT" --block &
  CHILDREN+=("$!")
  DIST_ARGS=(--pipeline-parallel-size "$NODES" --distributed-executor-backend ray)
fi

PORT="$(free_port "$ADDR")"
log "starting vllm serve on $ADDR:$PORT (model $MODEL_PATH, max length $CONTEXT)"
"$SERVER_BIN" serve "$MODEL_PATH" "${DEFAULT_FLAGS[@]}" --served-model-name "$SERVED_NAME" --host "$ADDR" \
  --port "$PORT" --tensor-parallel-size "$GPUS_PER_NODE" --max-model-len "$CONTEXT" --max-num-seqs "$PARALLEL" \
  --gpu-memory-utilization "$GPU_MEMORY_UTILIZATION" "${DIST_ARGS[@]}" "${EXTRA_FLAGS[@]}" &
SERVER_PID=$!
CHILDREN+=("$SERVER_PID")
# vLLM answers /health only once the engine has loaded the weights.
wait_ready "$SERVER_PID" "$ADDR" "$PORT" /health
write_connection "$ADDR" "$PORT"
serve_until_end "$SERVER_PID"
