"""The memento Python package against a real agent (CPU; Python buffers, no numpy or torch needed):
a tensor, a ZeRO flat partition and a blob round-trip bit-exact through snapshot and restore in a
new client; errors carry the C API's code and message."""
import array
import os
import shutil
import subprocess
import sys
import tempfile
import time
import unittest

sys.path.insert(0, os.environ.get("MEMENTO_PYTHON_DIR", os.path.join(os.path.dirname(__file__), "../../python")))
import memento  # noqa: E402

BIN = os.environ.get("MEMENTO_BIN_DIR", os.path.join(os.path.dirname(__file__), "../../build/bin"))


def pattern(n, seed):
    return array.array("f", [float((i * 7 + seed * 131) % 1009) / 7.0 for i in range(n)])


class AgentFixture(unittest.TestCase):
    """A private agent (one simulated node) for each test."""

    def setUp(self):
        self.tmp = tempfile.mkdtemp(prefix="memento-py-", dir=os.environ.get("MEMENTO_TEST_TMP"))
        self.job = "%s-py-%d-%s" % (os.environ.get("MEMENTO_TEST_PREFIX", "tlocal"), os.getpid(), self._testMethodName)
        self.sock = os.path.join(self.tmp, "agent-%n.sock")
        self.log = open(os.path.join(self.tmp, "agent.log"), "w")
        self.agent = subprocess.Popen(
            ["mpirun", "--oversubscribe", "-np", "1", os.path.join(BIN, "memento-agent"), "--job", self.job, "--socket",
             self.sock, "--catalog", os.path.join(self.tmp, "catalog-%n")], stdout=self.log, stderr=subprocess.STDOUT)
        deadline = time.time() + 30
        while not os.path.exists(self.sock.replace("%n", "0")):
            if self.agent.poll() is not None:
                with open(self.log.name) as f:
                    self.fail("the agent exited: " + f.read())
            self.assertLess(time.time(), deadline, "the agent did not start")
            time.sleep(0.02)

    def tearDown(self):
        self.agent.terminate()
        self.agent.wait()
        self.log.close()
        for f in os.listdir("/dev/shm"):
            if f.startswith("memento-" + self.job + "-"):
                os.unlink(os.path.join("/dev/shm", f))
        shutil.rmtree(self.tmp, ignore_errors=True)

    def client(self):
        return memento.Client(agent_socket=self.sock, job_id=self.job, rank=0, local_rank=0, world_size=1)


class AgentTest(AgentFixture):

    def register(self, c, w, flat, cursor):
        c.register_tensor("layer.w", w, global_shape=[2, 1024], offsets=[1, 0], lengths=[1, 1024])
        c.register_flat("layer.exp_avg", flat, global_shape=[4096], flat_begin=512)
        return c.register_blob("cursor", 64, get=lambda: cursor["value"],
                               set=lambda b: cursor.__setitem__("restored", b))

    def test_round_trip_bit_exact(self):
        w, flat, cursor = pattern(1024, 0), array.array("d", [0.0] * 256), {"value": b""}
        with self.client() as c:
            self.register(c, w, flat, cursor)
            c.finish_registration()
            for step in (1, 2, 3):
                c.wait_until_safe_to_update()
                w[:] = pattern(1024, step)
                flat[:] = array.array("d", [step + i / 8.0 for i in range(256)])
                cursor["value"] = b"sample=%d" % (step * 32)
                c.snapshot(step)
            c.wait_until_safe_to_update()
        w2, flat2, cursor2 = array.array("f", [0.0] * 1024), array.array("d", [0.0] * 256), {"value": b""}
        with self.client() as c:
            blob = self.register(c, w2, flat2, cursor2)
            c.finish_registration()
            self.assertEqual(c.restore(), 3)
            self.assertEqual(w2.tobytes(), pattern(1024, 3).tobytes())
            self.assertEqual(flat2.tobytes(), array.array("d", [3 + i / 8.0 for i in range(256)]).tobytes())
            self.assertEqual(blob.value, b"sample=96")
            self.assertEqual(cursor2["restored"], b"sample=96")

    def test_nothing_to_restore_and_restore_if_any(self):
        w = pattern(1024, 0)
        with self.client() as c:
            c.register_tensor("w", w)
            c.finish_registration()
            with self.assertRaises(memento.NothingToRestore) as e:
                c.restore()
            self.assertEqual(e.exception.code, 2)
            self.assertIn("no globally complete version to restore", e.exception.message)
            self.assertEqual(c.restore_if_any(), 0)

    def test_errors_carry_code_and_message(self):
        with self.client() as c:
            with self.assertRaises(memento.MementoError) as e:
                c.register_tensor("ro", b"\0" * 16, dtype=memento.U8)
            self.assertEqual(e.exception.code, 1)
            self.assertEqual(e.exception.message, "buffer is read-only: memento restores into it, so it must be writable")
            with self.assertRaises(memento.MementoError) as e:
                c.register_tensor("u16", array.array("H", [0] * 8))
            self.assertEqual(e.exception.message, "cannot tell the dtype of a buffer of format 'H': pass dtype=")
            blob = c.register_blob("b", 4)
            with self.assertRaises(memento.MementoError) as e:
                blob.set(b"12345")
            self.assertEqual(e.exception.message, "blob 'b' holds at most 4 bytes, got 5")
            w = pattern(8, 0)
            c.register_tensor("w", w)
            c.finish_registration()
            with self.assertRaises(memento.MementoError) as e:
                c.register_tensor("late", pattern(8, 1))
            self.assertEqual(e.exception.code_name, "FailedPrecondition")
            self.assertEqual(e.exception.message, "tensor 'late' registered after FinishRegistration()")

    def test_wrong_job_is_refused(self):
        with self.assertRaises(memento.MementoError) as e:
            memento.Client(agent_socket=self.sock, job_id="another-job", rank=0, local_rank=0, world_size=1)
        self.assertEqual(e.exception.code_name, "PermissionDenied")
        self.assertIn("another-job", e.exception.message)


if __name__ == "__main__":
    unittest.main(verbosity=2)
