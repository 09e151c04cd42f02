# ---- vllm.sh: vLLM's OpenAI server on one node (tensor parallel over its GPUs), behind a key-checking proxy ----
# vLLM's own API key guards only /v1: /invocations, /pooling, /score, /tokenize and others answer without it. So vLLM
# listens on a Unix socket in a 0700 directory on the node, which no other user can open, and keyproxy.py (Python
# standard library) listens on the node's address and forwards only requests that carry the session's key. The
# portal does not split vLLM over nodes: across nodes its workers talk over Ray or torch.distributed without
# authentication (catalog/runtime_rules.py; docs/security.md).
start_traps
load_modules
one_node_on_private_socket vLLM vllm
# The cluster's binary is the `vllm` command, or a Python interpreter with vLLM installed (CPU builds from PyPI
# carry no working `vllm` command).
case "$(basename "$SERVER_BIN")" in
  python*) SERVE=("$SERVER_BIN" -m vllm.entrypoints.openai.api_server --model "$MODEL_PATH") ;;
  *) SERVE=("$SERVER_BIN" serve "$MODEL_PATH") ;;
esac
if [ "${EMBEDDINGS:-0}" = 1 ]; then
  TASK_FLAGS=(--runner pooling --convert embed)
else
  TASK_FLAGS=(--max-num-seqs "$PARALLEL")
  # Without a parser vLLM answers any request with tools with a 400; with one it names on the card, it reads the
  # model's tool calls (the cluster's flags come after, so they can still say otherwise).
  if [ -n "${TOOL_CALL_PARSER:-}" ]; then
    TASK_FLAGS+=(--enable-auto-tool-choice --tool-call-parser "$TOOL_CALL_PARSER")
  fi
fi

lora_args vllm
log "starting vLLM on $SOCKET (model $MODEL_PATH, max length $CONTEXT)"
"${SERVE[@]}" "${DEFAULT_FLAGS[@]}" --served-model-name "$SERVED_NAME" --uds "$SOCKET" \
  --tensor-parallel-size "$GPUS_PER_NODE" --max-model-len "$CONTEXT" "${TASK_FLAGS[@]}" \
  --gpu-memory-utilization "$GPU_MEMORY_UTILIZATION" "${LORA_ARGS[@]}" "${EXTRA_FLAGS[@]}" &
SERVER_PID=$!
CHILDREN+=("$SERVER_PID")

# The proxy's /health is vLLM's own, which answers 200 only once the engine has loaded the weights.
serve_behind_key_proxy "$SERVER_PID" --upstream-socket "$SOCKET" /health
