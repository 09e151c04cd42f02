# ---- staging.sh: the model's files copied to node-local storage before the server starts ------------------------
# STAGE_TO is the job's $TMPDIR (resolved here, on the node), /dev/shm or a path the admin named. Copies live in
# <STAGE_TO>/hpc-llm-portal-<user>/<key>/ where the key hashes the source's path and each file's size and
# modification time, so a changed source is copied afresh and an unchanged one is reused. A job using a copy holds
# a shared flock on <key>.lock for its whole life (its server inherits the descriptor); making a copy holds it
# exclusively, so two jobs of the user on one node never copy the same model twice at once. With STAGE_KEEP=1 the
# copy stays for the next session; copies no job holds are removed oldest first when space runs short. With 0, and
# always on tmpfs (a kept copy would hold the node's memory after the job), the copy goes when the job stops, unless
# another job still uses it. Staging never stops a session: whatever goes wrong (no space, a failed copy, a root
# that is not the user's own directory), the server loads the model from where it lives and the log says why.
STAGE_FD="" STAGE_DROP="" STAGE_PARTIAL=""
ON_EXIT+=(stage_release)

# STATE BYTES TOTAL SECONDS FROM TO: $STAGING_FILE for the portal's progress line (the first node's only).
stage_report() {
  [ -z "$JOB_MODE" ] || return 0
  write_atomically "$SESSION_DIR/$STAGING_FILE" "$(printf \
    '{"state": "%s", "bytes": %d, "total": %d, "seconds": %d, "from": "%s", "to": "%s"}' "$@")"
}

# PATH: what makes up the model, one "name<TAB>bytes<TAB>mtime" line per file, names relative to its directory: a
# directory's files, or a GGUF with its other split parts (name-00001-of-00003.gguf ...).
stage_manifest() {
  if [ -d "$1" ]; then
    (cd "$1" && find -L . -type f ! -path '*/.*' -printf '%P\t%s\t%T@\n' | LC_ALL=C sort)
  elif [[ "$1" =~ ^(.*)-[0-9]{5}-of-([0-9]{5})\.gguf$ ]]; then
    find -L "${BASH_REMATCH[1]}"-[0-9][0-9][0-9][0-9][0-9]-of-"${BASH_REMATCH[2]}".gguf -maxdepth 0 -type f \
      -printf '%f\t%s\t%T@\n' | LC_ALL=C sort
  else
    find -L "$1" -maxdepth 0 -type f -printf '%f\t%s\t%T@\n'
  fi
}

# ROOT: the user's copies in ROOT, oldest use first: its own KEY and KEY.partial directories, never a link, nor
# anything else kept there (find -P lstat()s; the root is the user's 0700 directory, so nobody else can swap them).
stage_copies() {
  find -P "$1" -mindepth 1 -maxdepth 1 -type d -user "$(id -u)" -regextype posix-extended \
    -regex '.*/[0-9a-f]{20}(\.partial)?' -printf '%T@\t%p\n' | LC_ALL=C sort -n | cut -f 2-
}

# ROOT BYTES [SPARE]: room for BYTES (and 5 % more, at least 64 MiB) in ROOT, removing the user's oldest copies no
# job holds; BYTES=0 removes every such copy (tmpfs: none is kept) but SPARE's (the key this job is about to use).
stage_make_room() {
  local root=$1 need=$(($2 + $2 / 20 + 67108864)) dir
  [ "$2" = 0 ] || ! stage_free "$root" "$need" || return 0
  while IFS= read -r dir; do
    [ "${dir##*/}" != "${3:-}" ] || continue
    # A .partial is a copy being made under its key's exclusive lock, or one whose job died: free if the lock is.
    { flock -n -x 8 && rm -rf --one-file-system -- "$dir" && log "staging: removed the unused copy $dir"; } \
      8>>"${dir%.partial}.lock"
    [ "$2" = 0 ] || ! stage_free "$root" "$need" || return 0
  done < <(stage_copies "$root")
  [ "$2" = 0 ]
}

# BASE ROOT: make ROOT (0700 from its first moment) or say why it cannot be used. A root someone else made (a link
# planted in /tmp or /dev/shm before the user's first job, or another user's directory) would take the copy, the
# chmod and the eviction's rm -rf wherever it points; in a BASE others can write without the sticky bit, anyone
# could swap the root for such a thing after this check.
stage_root() {
  local mode owner="" kind=""
  mode=$(mkdir -p -- "$1" 2>/dev/null && stat -L -c %a -- "$1") || { echo "cannot write in $1"; return 1; }
  if (((8#$mode & 8#022) && !(8#$mode & 8#1000))); then echo "others can write in $1 (mode $mode, no sticky bit)"
  else
    mkdir -m 700 -- "$2" 2>/dev/null
    IFS=: read -r owner kind < <(stat -c '%u:%F' -- "$2" 2>/dev/null)
    if [ -z "$kind" ]; then echo "cannot write in $1"
    elif [ "$kind" != directory ]; then echo "$2 is a $kind, not a directory: not using it"
    elif [ "$owner" != "$(id -u)" ]; then echo "$2 belongs to uid $owner, not to $(id -un): not using it"
    elif chmod 700 -- "$2" 2>/dev/null; then return 0 # an older root may have been made with the umask's mode
    else echo "cannot make $2 private"; fi
  fi
  return 1
}

stage_free() { # DIR BYTES: at least BYTES are free there
  local kib
  kib=$(df -Pk "$1" 2>/dev/null | awk 'NR == 2 { print $4 }')
  [ -n "$kib" ] && [ "$((kib * 1024))" -ge "$2" ]
}

# Copy MODEL_PATH to node-local storage (or reuse the copy there) and point MODEL_PATH at the copy.
stage_model() {
  [ -n "${STAGE_TO:-}" ] || return 0
  local base src=$MODEL_PATH manifest total key root dest name started cpid bytes rate ticks why="" keep=${STAGE_KEEP:-1}
  if [ "$STAGE_TO" = '$TMPDIR' ]; then base=${TMPDIR:-}; else base=$STAGE_TO; fi
  name=$(basename "$src")
  if ! [[ "$base" =~ ^/[A-Za-z0-9_.+@/-]*$ ]]; then
    log "staging: no usable node-local directory (${STAGE_TO} is '${base}'): loading $src where it is"
    stage_report skipped 0 0 0 "$src" ""
    return 0
  fi
  [ -e "$src" ] || fail "cannot find the model $src on $(hostname -s)"
  manifest=$(stage_manifest "$src")
  [ -n "$manifest" ] || fail "the model $src has no files to load"
  total=$(printf '%s\n' "$manifest" | awk -F'\t' '{ s += $2 } END { printf "%d", s }')
  key=$(printf '%s\n%s\n' "$src" "$manifest" | sha256sum | cut -c 1-20)
  root="$base/hpc-llm-portal-$(id -un)"
  dest="$root/$key"
  if ! why=$(stage_root "$base" "$root") || ! { exec {STAGE_FD}>>"$dest.lock"; } 2>/dev/null; then
    log "staging: ${why:-cannot write in $root} on $(hostname -s): loading $src where it is"
    stage_report skipped 0 "$total" 0 "$src" ""
    STAGE_FD=""
    return 0
  fi
  why=$(stat -f -c %T -- "$root")
  if [ "$why" = tmpfs ] || [ "$why" = ramfs ]; then
    # Memory: a copy kept after the job would hold the node's RAM outside every job's limit. Also gone: the copies
    # of jobs that died without their trap (no job holds them).
    keep=0
    log "staging: $base is in memory ($why): the copy goes when the job ends"
    stage_make_room "$root" 0 "$key"
  fi
  if [ -f "$dest/.complete" ]; then
    log "staging: reusing the copy in $dest (same files, sizes and modification times as $src)"
  else
    flock -x "$STAGE_FD"
    if [ -f "$dest/.complete" ]; then
      log "staging: another job of yours made the copy in $dest meanwhile: reusing it"
    else
      rm -rf --one-file-system -- "$dest" "$dest.partial"
      if ! stage_make_room "$root" "$total"; then
        log "staging: not enough space in $base on $(hostname -s) for $((total / 1048576)) MiB: loading $src where it is"
        stage_report skipped 0 "$total" 0 "$src" ""
        stage_release
        return 0
      fi
      log "staging: copying $((total / 1048576)) MiB from $src to $dest"
      started=$SECONDS
      STAGE_PARTIAL="$dest.partial"
      mkdir -p "$dest.partial"
      if [ -d "$src" ]; then
        cp -rL "$src/." "$dest.partial/$name/" &
      else
        (cd "$(dirname "$src")" && exec cp -L $(printf '%s\n' "$manifest" | cut -f 1) "$dest.partial/") &
      fi
      cpid=$!
      CHILDREN+=("$cpid")
      # Reported about once a second; the end of the copy is seen within a fifth of one.
      ticks=0
      while kill -0 "$cpid" 2>/dev/null; do
        if [ $((ticks++ % 5)) = 0 ]; then
          bytes=$(du -sb "$dest.partial" 2>/dev/null | cut -f 1)
          stage_report copying "${bytes:-0}" "$total" $((SECONDS - started)) "$src" "$dest"
        fi
        sleep 0.2
      done
      if ! wait "$cpid" || [ "$(du -sb "$dest.partial" | cut -f 1)" -lt "$total" ]; then
        rm -rf --one-file-system -- "$dest.partial"
        log "staging: the copy to $dest failed: loading $src where it is"
        stage_report skipped 0 "$total" $((SECONDS - started)) "$src" ""
        stage_release
        return 0
      fi
      : >"$dest.partial/.complete"
      mv "$dest.partial" "$dest" || fail "cannot move the staged copy into $dest"
      STAGE_PARTIAL=""
      rate=$((total / 1048576 / (SECONDS - started > 0 ? SECONDS - started : 1)))
      log "staging: copied $((total / 1048576)) MiB in $((SECONDS - started)) s ($rate MiB/s)"
    fi
  fi
  flock -s "$STAGE_FD"
  touch "$dest"  # the newest copy is the last one removed for room
  [ "$keep" = 1 ] || STAGE_DROP=$dest
  stage_report "$([ -n "${started:-}" ] && echo copied || echo reused)" "$total" "$total" \
    $((SECONDS - ${started:-$SECONDS})) "$src" "$dest"
  MODEL_PATH="$dest/$name"
}

# When the job stops: let go of the copy; without STAGE_KEEP remove it, unless another job still holds it.
stage_release() {
  [ -z "$STAGE_PARTIAL" ] || rm -rf --one-file-system -- "$STAGE_PARTIAL"
  STAGE_PARTIAL=""
  [ -n "$STAGE_FD" ] || return 0
  if [ -n "$STAGE_DROP" ] && flock -n -x "$STAGE_FD"; then
    rm -rf --one-file-system -- "$STAGE_DROP" "$STAGE_DROP.lock"
    log "staging: removed the copy $STAGE_DROP"
  fi
  exec {STAGE_FD}>&-
  STAGE_FD="" STAGE_DROP=""
}
