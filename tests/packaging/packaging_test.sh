#!/usr/bin/env bash
# packaging: installs memento into a temporary prefix, builds examples/consumer against it with
# find_package(memento) (shared and static) and with pkg-config, and runs each against an agent
# started from the installed binaries.
set -euo pipefail
build=$1; src=$2
tmp=${MEMENTO_TEST_TMP:-$(mktemp -d)}
prefix=$tmp/prefix
cmake --install "$build" --prefix "$prefix" >/dev/null
for f in include/memento/snapshot/client.h include/memento/snapshot/memento.h lib/libmemento.a \
         lib/cmake/memento/mementoConfig.cmake lib/cmake/memento/mementoConfigVersion.cmake \
         lib/pkgconfig/memento.pc bin/memento bin/memento-agent bin/memento-run share/memento/proto/memento.proto; do
  [ -e "$prefix/$f" ] || { echo "missing from the install: $f"; exit 1; }
done
[ -e "$prefix/lib/libmemento.so" ] || { echo "missing from the install: lib/libmemento.so"; exit 1; }

cmake -S "$src/examples/consumer" -B "$tmp/consumer" -DCMAKE_PREFIX_PATH="$prefix" -DCMAKE_BUILD_TYPE=Release >/dev/null
cmake --build "$tmp/consumer" -j2 >/dev/null
PKG_CONFIG_PATH=$prefix/lib/pkgconfig c++ -o "$tmp/consumer_pc" "$src/examples/consumer/consumer.cc" \
  $(PKG_CONFIG_PATH=$prefix/lib/pkgconfig pkg-config --cflags --libs memento) -Wl,-rpath,"$prefix/lib"

job=${MEMENTO_TEST_PREFIX:-tpkg}-pkg-$$
export MEMENTO_JOB_ID=$job MEMENTO_AGENT_SOCKET=$tmp/agent-%n.sock
mpirun --oversubscribe -np 1 "$prefix/bin/memento-agent" --job "$job" --socket "$tmp/agent-%n.sock" \
  --catalog "$tmp/catalog-%n" >"$tmp/agent.log" 2>&1 &
agent=$!
stop_agent() { kill $agent 2>/dev/null || true; wait $agent 2>/dev/null || true; rm -f /dev/shm/memento-$job-*; }
trap stop_agent EXIT
for i in $(seq 200); do [ -S "$tmp/agent-0.sock" ] && break; sleep 0.05; done
n=3
for c in consumer consumer_static consumer_pc; do
  exe=$tmp/consumer/$c; [ $c = consumer_pc ] && exe=$tmp/consumer_pc
  out=$("$exe" $n)
  echo "$c: $out"
  [ "$out" = "consumer: restored step $n bit-exact" ] || { echo "FAILED: $c"; cat "$tmp/agent.log"; exit 1; }
  n=$((n + 3))   # each run continues the timeline at later steps
done
# The installed launcher finds the installed agent next to it and supervises the consumer.
stop_agent
out=$("$prefix/bin/memento-run" --simulate-nodes 1 --job "$job-run" --work-dir "$tmp/run" --quiet -- "$tmp/consumer/consumer" 2 2>&1) || {
  echo "FAILED: memento-run"; echo "$out"; cat "$tmp/run/agents.log"; exit 1; }
echo "$out" | grep -q "consumer: restored step 2 bit-exact" || { echo "FAILED: consumer under memento-run"; echo "$out"; exit 1; }
echo "$out" | grep -q "training finished (0 restarts" || { echo "FAILED: memento-run summary"; echo "$out"; exit 1; }
echo "memento-run: OK"
ldd "$tmp/consumer/consumer" | grep -q "$prefix/lib/libmemento.so" || { echo "consumer does not use the installed libmemento.so"; exit 1; }
echo "packaging: OK"
exit 0
