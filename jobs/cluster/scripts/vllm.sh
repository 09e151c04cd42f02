# ---- vllm.sh: vLLM's OpenAI server on one node (tensor parallel over its GPUs), behind a key-checking proxy ----
# vLLM's own API key guards only /v1: /invocations, /pooling, /score, /tokenize and others answer without it. So vLLM
# listens on a Unix socket in a 0700 directory on the node, which no other user can open, and keyproxy.py (Python
# standard library) listens on the node's address and forwards only requests that carry the session's key. The
# portal does not split vLLM over nodes: across nodes its workers talk over Ray or torch.distributed without
# authentication (catalog/runtime_rules.py; docs/security.md).
start_traps
load_modules
[ -e "$MODEL_PATH" ] || fail "cannot find the model directory $MODEL_PATH on $(hostname -s)"
[ "$NODES" -eq 1 ] || fail "vLLM runs on a single node in the portal"
ADDR="$(node_addr)"
# Node-local and short: a socket path has at most 107 bytes, and shared filesystems may not hold sockets.
SOCKET_DIR="$(mktemp -d "${TMPDIR:-/tmp}/hpcllm.XXXXXXXX")" || fail "cannot make a private directory in ${TMPDIR:-/tmp}"
CLEANUP_PATHS+=("$SOCKET_DIR")
SOCKET="$SOCKET_DIR/vllm.sock"

log "starting vLLM on $SOCKET (model $MODEL_PATH, max length $CONTEXT)"
"$SERVER_BIN" serve "$MODEL_PATH" "${DEFAULT_FLAGS[@]}" --served-model-name "$SERVED_NAME" --uds "$SOCKET" \
  --tensor-parallel-size "$GPUS_PER_NODE" --max-model-len "$CONTEXT" --max-num-seqs "$PARALLEL" \
  --gpu-memory-utilization "$GPU_MEMORY_UTILIZATION" "${EXTRA_FLAGS[@]}" &
SERVER_PID=$!
CHILDREN+=("$SERVER_PID")

PORT="$(free_port "$ADDR")"
python3 "$SESSION_DIR/keyproxy.py" --listen "$ADDR" --port "$PORT" --upstream-socket "$SOCKET" \
  --health-path /health --key-file "$SESSION_DIR/api_key" &
PROXY_PID=$!
CHILDREN+=("$PROXY_PID")
# The proxy's /health is vLLM's own, which answers 200 only once the engine has loaded the weights.
wait_ready "$SERVER_PID" "$ADDR" "$PORT" /health
kill -0 "$PROXY_PID" 2>/dev/null || fail "the key proxy stopped"
write_connection "$ADDR" "$PORT"
serve_until_end "$SERVER_PID"
