"""Atomic checkpoints for every stage: `Trainer` writes checkpoint `N` into `tmp-checkpoint-N/`, which is renamed to
`checkpoint-N` once every process has finished writing. An interrupted save leaves only the staging folder, which
`resume_from_checkpoint=True` (it looks for `checkpoint-N`) ignores and the next save of that step replaces; the
previous checkpoints stay intact."""

import os
import shutil
from pathlib import Path

from transformers.trainer_utils import PREFIX_CHECKPOINT_DIR, rotate_checkpoints

STAGING_PREFIX = "tmp-"


class AtomicCheckpoints:
    """Mixin for `Trainer` subclasses; `_save_resume_state(folder)` adds what `Trainer` itself does not save."""

    _staging_root: Path | None = None

    def _get_output_dir(self, trial) -> str:
        return str(self._staging_root) if self._staging_root is not None else super()._get_output_dir(trial)

    def _save_checkpoint(self, model, trial) -> None:
        name = f"{PREFIX_CHECKPOINT_DIR}-{self.state.global_step}"
        run_dir = Path(super()._get_output_dir(trial))
        staging_root, final = run_dir / f"{STAGING_PREFIX}{name}", run_dir / name
        if self.args.should_save and staging_root.exists():  # left by an interrupted save of this step
            shutil.rmtree(staging_root)
        self.accelerator.wait_for_everyone()
        self._staging_root = staging_root
        try:
            self._write_checkpoint(model, trial)
            self._save_resume_state(staging_root / name)
        finally:
            self._staging_root = None
        self.accelerator.wait_for_everyone()  # every process has written its part (RNG states, shards)
        if self.args.should_save:
            if final.exists():  # the same step saved again (a resumed run): the new one replaces it
                shutil.rmtree(final)
            os.replace(staging_root / name, final)
            staging_root.rmdir()
            if self.state.best_model_checkpoint == str(staging_root / name):
                self.state.best_model_checkpoint = str(final)
            rotate_checkpoints(str(run_dir), self.args.save_total_limit, self.state.best_model_checkpoint,
                               use_mtime=True)
        self.accelerator.wait_for_everyone()
        if self.args.push_to_hub:
            super()._push_from_checkpoint(str(final))

    def _write_checkpoint(self, model, trial) -> None:
        """The parent trainer's checkpoint (a stage may pick which parent's)."""
        super()._save_checkpoint(model, trial)

    def _push_from_checkpoint(self, checkpoint_folder: str) -> None:
        if self._staging_root is None:  # pushed by `_save_checkpoint` once the checkpoint is in place
            super()._push_from_checkpoint(checkpoint_folder)

    def _save_resume_state(self, folder: Path) -> None:
        """Write what resuming needs beyond `Trainer`'s model, optimizer, scheduler, RNG and trainer state."""
