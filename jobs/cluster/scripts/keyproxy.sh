# ---- keyproxy.sh: keyproxy.py in front of a server that must not be reached without the session's key -----------
# vLLM guards only /v1 with its key, `transformers serve` and ollama have none: they listen where no other user can
# reach them (a Unix socket in the private run directory, or the node's loopback on a node the job holds alone),
# and keyproxy.py (Python standard library) listens on the node's address and forwards only requests that carry the
# key (docs/security.md).

# SERVER_PID --upstream-socket PATH | --upstream-port PORT, HEALTH_PATH: the proxy on the node's address; ready once
# the server's own HEALTH_PATH answers 200 through it; then serve until the server ends.
serve_behind_key_proxy() {
  local server_pid=$1 upstream_option=$2 upstream=$3 health_path=$4 addr port proxy_pid
  addr="$(node_addr)"
  port="$(free_port "$addr")"
  python3 "$SESSION_DIR/keyproxy.py" --listen "$addr" --port "$port" "$upstream_option" "$upstream" \
    --health-path "$health_path" --key-file "$SESSION_DIR/$API_KEY_FILE" &
  proxy_pid=$!
  CHILDREN+=("$proxy_pid")
  wait_ready "$server_pid" "$addr" "$port" /health
  kill -0 "$proxy_pid" 2>/dev/null || fail "the key proxy stopped"
  write_connection "$addr" "$port"
  serve_until_end "$server_pid"
}
