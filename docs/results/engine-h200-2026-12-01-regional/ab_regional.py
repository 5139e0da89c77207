"""A/B in one process: the engine compiled per block (the new code) vs the whole step compiled (the
previous code, rebuilt as a subclass), Llama-2-7B shape, bf16, dense and R-Sparse 50% (rho 0.9)."""
import json, os, sys, torch
from rsparse.runtime.bench import decode as D
import rsparse.runtime.engine as E

Block = E.Engine

class Step(E.Engine):
    def __init__(self, model, **kw):
        super().__init__(model, **kw)
        if self.compile:
            self._decode_block = self._block
            self._whole = torch.compile(self._decode_logits, fullgraph=True, dynamic=False)

    def _step(self, sampling):
        self._advance(self._choose(self._whole(self.token, self.pos), sampling))

model = D.build_model("llama2-7b", torch.bfloat16)
prompt = torch.randint(0, 32000, (512,), generator=torch.Generator().manual_seed(3)).tolist()
out = []
def run(label, cls):
    E.Engine = cls
    torch._dynamo.reset()
    t = D.time_engine(model, prompt, 128, 2)
    out.append({"row": label, **t})
    print(f"{label}: {t['tokens_per_s']:.1f} tok/s, warm-up {t['warmup_s']:.1f} s (compile+capture {t['compile_capture_s']:.1f}), first tokens {t['first_tokens']}", flush=True)
run("dense, per block", Block); run("dense, whole step", Step)
D.make_rsparse(model, 0.5, 0.9)
E.Engine = Block
print("achieved", D.measure_sparsity(model, prompt), flush=True)
run("R-Sparse 50%, per block", Block); run("R-Sparse 50%, whole step", Step)
os.makedirs(os.environ["OUT"], exist_ok=True)
json.dump(out, open(os.path.join(os.environ["OUT"], "ab_regional.json"), "w"), indent=1)
