"""Worker of tests/test_checkpoint.py's kill-and-resume test (run as a subprocess, not collected).

    python resume_worker.py run    CKPT_DIR OUT_DIR STEPS EVERY   # reference path, then a checkpointed
                                                                 # search printing "step t" (to be killed)
    python resume_worker.py resume CKPT_DIR OUT_DIR STEPS EVERY   # resume it and write the path

Both use the same tiny BERT and data, so the resumed path must equal the reference bit for bit.
"""
import os
import sys
import time
import warnings

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import spp  # noqa: E402
from helpers import bert_batch, tiny_bert  # noqa: E402


def search(steps, **kw):
    model = tiny_bert(0, layers=2)
    data = [bert_batch(s) for s in range(4)]  # 4 batches, checkpoints every 3 steps: positions differ
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)
        return spp.search(spp.attach(model), data, steps=steps, progress=False, **kw)


def main():
    mode, ckpt_dir, out_dir, steps, every = sys.argv[1], sys.argv[2], sys.argv[3], int(sys.argv[4]), int(sys.argv[5])
    if mode == "run":
        search(steps).save(os.path.join(out_dir, "reference"))
        print("ready", flush=True)

        def report(t, loss, handle):
            print(f"step {t}", flush=True)
            time.sleep(0.03)  # leave the parent time to kill us mid-run

        search(steps, checkpoint_dir=ckpt_dir, checkpoint_every=every, callback=report)
        print("finished", flush=True)
    elif mode == "resume":
        search(steps, checkpoint_dir=ckpt_dir, checkpoint_every=every, resume=True).save(os.path.join(out_dir, "resumed"))
    else:
        raise SystemExit(f"unknown mode {mode!r}")


if __name__ == "__main__":
    main()
