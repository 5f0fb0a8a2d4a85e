"""Atomic checkpoints for every stage: `Trainer` writes checkpoint `N` into `tmp-checkpoint-N/`, which is renamed to
`checkpoint-N` once every process has finished writing. An interrupted save leaves only the staging folder, which
`resume_from_checkpoint=True` (it looks for `checkpoint-N`) ignores and the next save of that step replaces; the
previous checkpoints stay intact. Under FSDP a checkpoint of a model trained around frozen weights (LoRA, projector)
holds what trains, not the whole model."""

import os
import shutil
from pathlib import Path

import torch
from accelerate.utils import save_fsdp_optimizer
from transformers.trainer import SCHEDULER_NAME
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

    def _save_optimizer_and_scheduler(self, output_dir: str) -> None:
        """`Trainer`'s, except under FSDP for a model with frozen weights (the base under a LoRA, the LLM beside a
        projector): `Trainer` would gather the whole model, frozen weights included, to process 0 at every save
        (`pytorch_model_fsdp.bin`); here the checkpoint's model part is what trains (`_save_trained_state`), beside
        the optimizer state (which only ever holds what trains) and the scheduler. A model that trains whole is saved
        as accelerate saves it, whole or sharded as `fsdp_state_dict_type` says."""
        if not self.is_fsdp_enabled or self._fsdp_checkpoints_model():
            super()._save_optimizer_and_scheduler(output_dir)
            return
        self._save_trained_state(output_dir)
        fsdp = self.accelerator.state.fsdp_plugin
        save_fsdp_optimizer(fsdp, self.accelerator, self.optimizer, self.model, output_dir)
        if self.args.should_save:
            torch.save(self.lr_scheduler.state_dict(), Path(output_dir, SCHEDULER_NAME))

    def _fsdp_checkpoints_model(self) -> bool:
        """Under FSDP, whether accelerate checkpoints the model itself: when all of it trains."""
        model = self.accelerator.unwrap_model(self.model)
        return self.is_fsdp_enabled and all(parameter.requires_grad for parameter in model.parameters())

    def _save_trained_state(self, output_dir: str) -> None:
        """Under FSDP, the trained weights of a model with frozen ones, where resuming reads them (collective)."""
        raise NotImplementedError
