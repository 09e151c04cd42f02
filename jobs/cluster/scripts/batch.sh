# ---- batch.sh: batch runs (docs/batch.md): a batch launch's run and its replicas; runs on a running session -----
# Which run gets a runner, when one is started again and when a run is given up is supervisor.py's to decide (one
# restart policy for both kinds); the shell starts it, and ends a batch launch's job with its run.

# [--run RUN --concurrency N] --server URL...: supervisor.py, with the layout's names it needs in its environment.
# A llama-server with adapters is asked for its base weights by every request (a slot keeps its last request's).
batch_supervisor() {
  local base=()
  [ "${RUNTIME:-}" != llama.cpp ] || [ -z "${ADAPTER_RUNS[*]:-}" ] || base=(--base-weights)
  REQUESTS_FILE=$REQUESTS_FILE RESULTS_FILE=$RESULTS_FILE PROGRESS_FILE=$PROGRESS_FILE OUTPUT_FILE=$OUTPUT_FILE \
    CONCURRENCY_FILE=$CONCURRENCY_FILE START_MARK=$START_MARK STOP_MARK=$STOP_MARK RUN_ERROR_FILE=$RUN_ERROR_FILE \
    python3 "$SESSION_DIR/supervisor.py" --batch-dir "$SESSION_DIR/$BATCH_DIR" --runner "$SESSION_DIR/batchrun.py" \
    --key-file "$SESSION_DIR/$API_KEY_FILE" --model "$SERVED_NAME" --interval "${BATCH_LOOK_S:-1}" "${base[@]}" "$@" &
  SUPERVISOR_PID=$!
  CHILDREN+=("$SUPERVISOR_PID")
}

# SERVER_PID ARRAY_NAME: a batch launch's further replicas: this same script as `replica` on the job's other nodes,
# each with a server of its own; their addresses are added to the named array as --server arguments. The run starts
# once all have reported or READY_TIMEOUT_S has passed (with those that did); a replica that dies later only means
# fewer servers: the runner sends its prompts to the others.
start_replicas() {
  local server_pid=$1 others=$((REPLICAS - 1)) deadline=$((SECONDS + READY_TIMEOUT_S)) files f endpoint
  local -n into=$2
  log "starting $others more replica(s) of the server on the job's other nodes"
  srun --nodes="$others" --ntasks="$others" --ntasks-per-node=1 --relative=1 bash "$SESSION_DIR/$JOB_SCRIPT" replica &
  CHILDREN+=("$!")
  while :; do
    shopt -s nullglob
    files=("$SESSION_DIR/$REPLICA_ADDR_PREFIX"*"$ADDR_SUFFIX")
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

# SERVER_PID: a batch launch's work: the run's requests to the server(s), then the job ends with the run. The job
# fails if the server stops first, or once the supervisor gave the run up; after a requeue it goes on where it was.
run_batch() {
  local server_pid=$1 dir="$SESSION_DIR/$BATCH_DIR/$BATCH_RUN" servers=(--server "http://$SERVED_AT")
  [ -f "$dir/$REQUESTS_FILE" ] || fail "the batch run's requests are missing ($dir/$REQUESTS_FILE)"
  [ "${REPLICAS:-1}" -le 1 ] || start_replicas "$server_pid" servers
  log "batch run $BATCH_RUN: $(wc -l <"$dir/$REQUESTS_FILE") requests, $BATCH_CONCURRENCY at a time on each of $((${#servers[@]} / 2)) server(s)"
  batch_supervisor --run "$BATCH_RUN" --concurrency "$BATCH_CONCURRENCY" "${servers[@]}"
  # Whichever ends first (portable: `wait -n PID...` needs bash 5.1): the supervisor, or the server (it crashed).
  while kill -0 "$SUPERVISOR_PID" 2>/dev/null && kill -0 "$server_pid" 2>/dev/null; do sleep 1; done
  if kill -0 "$SUPERVISOR_PID" 2>/dev/null; then
    wait "$server_pid"
    fail "$(server_error "the server stopped with code $? during the batch run; what it answered is kept")"
  fi
  wait "$SUPERVISOR_PID" ||
    fail "the batch run was given up: $(head -c 1000 "$dir/$RUN_ERROR_FILE" 2>/dev/null || echo 'see the job log')"
  log "batch run $BATCH_RUN finished"
  rm -f "$SESSION_DIR/$CONNECTION_FILE"
  exit 0
}

# While a session serves: the portal stages a run in its own folder (the requests, then a start mark) and the job
# starts supervisor.py once the first one is there, so a session that never takes a run never starts Python for it.
SUPERVISOR_PID="" SUPERVISOR_STARTS=0
supervise_batches() {
  if [ -n "$SUPERVISOR_PID" ]; then
    kill -0 "$SUPERVISOR_PID" 2>/dev/null && return 0
    wait "$SUPERVISOR_PID"
    log "the batch supervisor stopped with code $?"
    SUPERVISOR_PID=""
  fi
  [ "$SUPERVISOR_STARTS" -lt 5 ] || return 0 # it cannot run here (the log says why): the runs stay waiting
  compgen -G "$SESSION_DIR/$BATCH_DIR/*/$START_MARK" >/dev/null || return 0
  SUPERVISOR_STARTS=$((SUPERVISOR_STARTS + 1))
  batch_supervisor --server "http://$SERVED_AT"
}
