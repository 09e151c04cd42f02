# ---- finetune.sh: a fine-tune run (docs/finetune.md): the trainer on the cluster's PyTorch environment ----------
# $SERVER_BIN is that environment's Python (the catalog's transformers runtime), which runs finetune.py from beside
# this script: it reads the run's settings ($TRAIN_CONFIG_FILE) and data ($TRAIN_FILE, $VALID_FILE), goes on from the
# newest whole checkpoint in $CHECKPOINTS_DIR when there is one, writes $TRAIN_PROGRESS_FILE as it goes and the
# adapter into $ADAPTER_DIR at the end. Which step, which checkpoint, when to stop: finetune.py's to decide. A run
# that trains another run's adapter further ($PARENT_RUN, that run's uuid) hands the trainer that run's $ADAPTER_DIR
# beside this one; its own newest checkpoint, if any, still comes first.
#
# Slurm's warning before the time limit or a preemption (--signal=B:USR1@N) reaches this shell, which hands it to the
# trainer: it saves a checkpoint and stops with code 75, and the job asks Slurm to requeue it, so the run goes on from
# that checkpoint in a new allocation. A requeue from outside (scontrol requeue, a node failure) stops it with TERM:
# the trainer saves what it can in the time Slurm gives, and the next start goes on from the newest whole checkpoint.
start_traps
load_modules
private_run_dir
export HF_DATASETS_OFFLINE=1 TRANSFORMERS_OFFLINE=1 TOKENIZERS_PARALLELISM=false
MAX_REQUEUES=20 # starts after a warning; a run that needs more should ask for more walltime
TRAINER_STOPPED=75
TRAINER_PID=""
rm -f "$SESSION_DIR/$ERROR_FILE" # an earlier start's reason is not this one's

warned() {
  log "Slurm warns that the job is about to stop: the trainer saves a checkpoint"
  [ -z "$TRAINER_PID" ] || kill -USR1 "$TRAINER_PID" 2>/dev/null
}
trap warned USR1

PARENT_ARGS=()
if [ -n "${PARENT_RUN:-}" ]; then
  [[ "$PARENT_RUN" =~ ^[0-9a-f]{8}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{12}$ ]] || fail "bad parent run '$PARENT_RUN'"
  PARENT_ARGS=(--parent "$SESSIONS_DIR/$PARENT_RUN/$ADAPTER_DIR")
  log "training further the adapter of fine-tune run $PARENT_RUN"
fi

log "fine-tune run $SESSION_ID on $(hostname -s): start $((RESTARTS + 1)), model $MODEL_PATH"
"$SERVER_BIN" "$SESSION_DIR/finetune.py" --model "$MODEL_PATH" --config "$SESSION_DIR/$TRAIN_CONFIG_FILE" \
  --train "$SESSION_DIR/$TRAIN_FILE" --valid "$SESSION_DIR/$VALID_FILE" \
  --progress "$SESSION_DIR/$TRAIN_PROGRESS_FILE" --checkpoints "$SESSION_DIR/$CHECKPOINTS_DIR" \
  --adapter "$SESSION_DIR/$ADAPTER_DIR" --error "$SESSION_DIR/$ERROR_FILE" --restarts "$RESTARTS" \
  ${PARENT_ARGS[@]+"${PARENT_ARGS[@]}"} &
TRAINER_PID=$!
CHILDREN+=("$TRAINER_PID")
while :; do
  wait "$TRAINER_PID"
  rc=$?
  kill -0 "$TRAINER_PID" 2>/dev/null || break # else a signal's trap ended the wait, not the trainer
done

if [ "$rc" -eq 0 ]; then
  log "fine-tune run $SESSION_ID trained every planned step; the adapter is in $ADAPTER_DIR"
  # llama-server loads an adapter as GGUF (--lora): llama.cpp's own converter, installed beside the cluster's
  # llama-server, makes it with this environment's Python. Without it the adapter still serves on vLLM.
  if [ -n "${LORA_CONVERTER:-}" ] && [ -f "$LORA_CONVERTER" ]; then
    rm -f "$SESSION_DIR/$ADAPTER_GGUF"
    if "$SERVER_BIN" "$LORA_CONVERTER" --base "$MODEL_PATH" --outtype f32 \
      --outfile "$SESSION_DIR/$ADAPTER_GGUF.tmp" "$SESSION_DIR/$ADAPTER_DIR" &&
      mv -f "$SESSION_DIR/$ADAPTER_GGUF.tmp" "$SESSION_DIR/$ADAPTER_GGUF"; then
      log "the adapter as GGUF for llama.cpp: $ADAPTER_GGUF"
    else
      log "warning: llama.cpp's converter could not make a GGUF of the adapter (above); llama.cpp cannot load it"
    fi
  fi
  exit 0
fi
if [ "$rc" -eq "$TRAINER_STOPPED" ]; then
  [ "$RESTARTS" -lt "$MAX_REQUEUES" ] ||
    fail "the run was stopped at its time limit $((RESTARTS + 1)) times; resume it with more walltime"
  log "the trainer saved a checkpoint: asking Slurm to requeue the job, which goes on from there"
  scontrol requeue "${SLURM_JOB_ID:-}" ||
    fail "the trainer saved a checkpoint, but Slurm would not requeue the job (scontrol requeue failed)"
  sleep 600 & # Slurm stops this allocation now (TERM, the traps above)
  wait $!
  exit 0
fi
if [ -s "$SESSION_DIR/$ERROR_FILE" ]; then
  log "error: $(head -c 1000 "$SESSION_DIR/$ERROR_FILE")"
  exit 1
fi
fail "the trainer stopped with code $rc; the job log says why"
