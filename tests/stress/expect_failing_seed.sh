#!/usr/bin/env bash
# expect_failing_seed.sh MEMENTO_STRESS: a round checked against a corrupted reference hash must be
# reported as failed, with its seed, the mismatch and the replay command, and exit status 1.
set -u
stress=$1
out=$("$stress" --rounds 1 --seed 14 --corrupt-reference --work-dir "$MEMENTO_TEST_TMP/stress" 2>&1)
rc=$?
echo "$out"
fail() { echo "FAILED: $*"; exit 1; }
[ "$rc" -eq 1 ] || fail "exit status $rc, expected 1"
ref=$(echo "$out" | sed -n 's/^memento-stress: reference \(state_hash=[0-9a-f]*-corrupted\) .*/\1/p')
[ -n "$ref" ] || fail "no corrupted reference line"
good=${ref%-corrupted}
echo "$out" | grep -qx "round 0 seed 14: FAILED (rank-crash rank-crash:rank=7:step=10; flush-every 5)" \
  || fail "no FAILED line for seed 14"
echo "$out" | grep -qx "    state $good != reference $ref" || fail "no state mismatch line"
echo "$out" | grep -q "^    replay: .*/memento-stress --seed 14 --rounds 1 " || fail "no replay line"
echo "$out" | grep -qx "failing seeds: 14" || fail "no failing seeds line"
echo "$out" | grep -qx "memento-stress: 0 of 1 rounds passed (seed 14, 4 nodes x 2 ranks, --ec rs:2, 20 steps)" \
  || fail "no summary line"
echo "checker reported the failing seed"
