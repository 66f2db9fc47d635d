# Sourced by the benchmark scripts: a scratch directory with the upstream's files, removed at
# exit, and every process whose pid is added to PIDS stopped at exit.
WORK=$(mktemp -d)
chmod 755 "$WORK"
PIDS=()
# Waits for the processes before removing their directory (nginx removes its pid file there).
cleanup() {
  for pid in "${PIDS[@]}"; do kill "$pid" 2>/dev/null || true; done
  wait "${PIDS[@]}" 2>/dev/null || true
  rm -rf "$WORK"
}
trap cleanup EXIT

mkdir -p "$WORK/www"
head -c 1024 /dev/zero | tr '\0' 'a' > "$WORK/www/1k"
head -c 102400 /dev/zero | tr '\0' 'b' > "$WORK/www/100k"
echo ok > "$WORK/www/up"
