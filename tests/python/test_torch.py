"""The memento Python package with PyTorch: a model, its AdamW state and the RNG round-trip
bit-exact through snapshot and restore (on CUDA when present, else CPU), and training continued
from the restore matches training that never stopped. Exits 77 (skipped) without torch."""
import os
import sys

try:
    import torch
except ImportError:
    print("SKIP: torch is not installed here (this test runs on the GPU machine)")
    sys.exit(77)

sys.path.insert(0, os.environ.get("MEMENTO_PYTHON_DIR", os.path.join(os.path.dirname(__file__), "../../python")))
import test_client  # noqa: E402  (the agent fixture)
import unittest  # noqa: E402

import memento  # noqa: E402

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"


def make(seed):
    torch.manual_seed(seed)
    model = torch.nn.Sequential(torch.nn.Linear(64, 256), torch.nn.GELU(), torch.nn.Linear(256, 64),
                                torch.nn.LayerNorm(64)).to(DEVICE)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    return model, opt


def train_step(model, opt, step):
    g = torch.Generator(device="cpu").manual_seed(1000 + step)
    x = torch.randn(32, 64, generator=g).to(DEVICE)
    loss = (model(x) - x).pow(2).mean() + torch.rand(1).to(DEVICE) * 0  # consumes the RNG
    loss.backward()
    opt.step()  # the pre-step hook waits for the last snapshot's copy
    opt.zero_grad(set_to_none=False)


class TorchTest(test_client.AgentFixture):
    def setup_client(self, model, opt):
        c = self.client()
        c.register_module(model)
        c.register_optimizer(opt, model)
        c.register_rng()
        c.finish_registration()
        return c

    def test_model_optimizer_rng_round_trip(self):
        model, opt = make(1)
        c = self.setup_client(model, opt)
        for step in (1, 2, 3):
            train_step(model, opt, step)
            c.snapshot(step)
        c.wait_until_safe_to_update()
        saved = {k: v.clone() for k, v in model.state_dict().items()}
        saved_opt = [{k: (v.clone() if torch.is_tensor(v) else v) for k, v in s.items()} for s in opt.state.values()]
        rng = torch.get_rng_state().clone()
        # Training goes on without the restore: the reference for what follows.
        for step in (4, 5):
            train_step(model, opt, step)
        reference = {k: v.clone() for k, v in model.state_dict().items()}
        c.close()

        torch.manual_seed(999)  # a different RNG state, overwritten by the restore
        model2, opt2 = make(2)
        c2 = self.setup_client(model2, opt2)
        self.assertEqual(c2.restore(), 3)
        for k, v in model2.state_dict().items():
            self.assertTrue(torch.equal(v, saved[k]), k)
        for s, ref in zip(opt2.state.values(), saved_opt):
            for k in ("exp_avg", "exp_avg_sq", "step"):
                self.assertTrue(torch.equal(s[k].cpu(), ref[k].cpu()), k)
        self.assertTrue(torch.equal(torch.get_rng_state(), rng))
        for step in (4, 5):
            train_step(model2, opt2, step)
        for k, v in model2.state_dict().items():
            self.assertTrue(torch.equal(v, reference[k]), k)
        c2.close()


if __name__ == "__main__":
    unittest.main(verbosity=2)
