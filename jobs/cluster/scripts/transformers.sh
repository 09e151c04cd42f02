# ---- transformers.sh: `transformers serve` on one node, for architectures the other runtimes do not support ---------
# `transformers serve` has no API key at all. tfserve.py starts it on a Unix socket in the run's 0700 directory,
# which no other user can open, and fixes what OpenAI clients expect (the stream's final `data: [DONE]`, the model
# list); keyproxy.py (Python standard library) listens on the node's address and forwards only requests that carry
# the session's key. One node: transformers places a model on one node's GPUs (device_map "auto").
start_traps
load_modules
one_node_on_private_socket transformers transformers

log "starting transformers serve on $SOCKET (model $MODEL_PATH)"
"$SERVER_BIN" "$SESSION_DIR/tfserve.py" --socket "$SOCKET" --served-name "$SERVED_NAME" -- "$MODEL_PATH" \
  "${DEFAULT_FLAGS[@]}" "${EXTRA_FLAGS[@]}" &
SERVER_PID=$!
CHILDREN+=("$SERVER_PID")

serve_behind_key_proxy "$SERVER_PID" --upstream-socket "$SOCKET" /health
