# ---- ollama.sh: ollama serve on the node's loopback, behind a key-checking proxy ------------------------------
# ollama has no API key. It listens on 127.0.0.1 only, and keyproxy.py (Python standard library) listens on the
# node's address and forwards only requests that carry the session's key. The job asks for --exclusive=user, so
# no other user's job shares the node and can reach its loopback (sites with pam_slurm_adopt keep other users
# from logging in to it). docs/architecture.md explains the choice.
start_traps
load_modules
INNER_PORT="$(free_port 127.0.0.1)"
export OLLAMA_HOST="127.0.0.1:$INNER_PORT"
[ -z "$MODEL_DIR" ] || export OLLAMA_MODELS="$MODEL_DIR"
export OLLAMA_NUM_PARALLEL="$PARALLEL" OLLAMA_CONTEXT_LENGTH="$CONTEXT" OLLAMA_KEEP_ALIVE=-1
log "starting ollama serve on 127.0.0.1:$INNER_PORT (models in ${OLLAMA_MODELS:-the default directory})"
"$SERVER_BIN" serve "${DEFAULT_FLAGS[@]}" "${EXTRA_FLAGS[@]}" &
SERVER_PID=$!
CHILDREN+=("$SERVER_PID")
wait_ready "$SERVER_PID" 127.0.0.1 "$INNER_PORT" /api/version

if ! "$SERVER_BIN" show "$OLLAMA_TAG" >/dev/null 2>&1; then
  if [ -n "$MODEL_PATH" ]; then
    log "creating $OLLAMA_TAG from $MODEL_PATH"
    printf 'FROM %s\n' "$MODEL_PATH" >"$SESSION_DIR/$OLLAMA_MODELFILE"
    "$SERVER_BIN" create "$OLLAMA_TAG" -f "$SESSION_DIR/$OLLAMA_MODELFILE" || fail "$(server_error "ollama create $OLLAMA_TAG failed")"
  else
    log "pulling $OLLAMA_TAG"
    "$SERVER_BIN" pull "$OLLAMA_TAG" || fail "$(server_error "ollama pull $OLLAMA_TAG failed")"
  fi
fi
# An empty generate request loads the model into GPU memory; ready means loaded, not just listening.
status="$(http_status POST 127.0.0.1 "$INNER_PORT" /api/generate "{\"model\": \"$OLLAMA_TAG\", \"keep_alive\": -1}" "$READY_TIMEOUT_S")"
[ "$status" = 200 ] || fail "$(server_error "ollama could not load $OLLAMA_TAG (HTTP $status)")"

serve_behind_key_proxy "$SERVER_PID" --upstream-port "$INNER_PORT" /api/version
