"""FSDP on the CPU side: the per-block wrap policy, and sharded checkpoint directories (torch.distributed.checkpoint's
format, as Lightning's FSDPStrategy writes them): `pretrain.load` and `pretrain export` read them, a damaged or crafted
one is refused with one line and runs no code, the callback keeps whole directories only and points last.ckpt at the
newest. (FSDP itself needs a GPU: tests/test_gpu.py trains, resumes and exports through it.)"""

import errno
import os
import pickle
import shutil
from pathlib import Path

import pytest
import torch
import torch.distributed.checkpoint as dcp
from pytorch_lightning.strategies import FSDPStrategy
from torch.distributed.checkpoint.api import CheckpointException

import pretrain
from models import Transformer
from objectives import ReplacedTokenDetection
from pretrain.cli import main
from pretrain.errors import UserError
from pretrain.sample import BUNDLED_CORPUS
from pretrain.training.checkpoints import (
    SHARD_METADATA,
    Checkpoints,
    CheckpointWriteError,
    SafeCheckpointIO,
    check_checkpoint_file,
    read_checkpoint,
)
from pretrain.training.distributed import BlockWrapPolicy, blocks_to_wrap, fsdp_strategy, writes_sharded
from pretrain.training.resume import resolve, saved_recipe
from tests.helpers import MASK, ROOT, SPECIAL_IDS, run_cli, tiny_config


def fit_arguments(tmp: Path, run: Path, *extra: str) -> list[str]:
    return ["fit", "-c", str(ROOT / "configs" / "tiny" / "bert.yaml"), "--data.files", f"[{BUNDLED_CORPUS}]",
            "--data.tokenizer", str(tmp / "tokenizer.json"), "--data.tokenizer_vocab_size", "400",
            "--model.backbone.vocab_size", "400", "--data.cache_dir", str(tmp / "cache"),
            "--trainer.default_root_dir", str(run), "--trainer.accelerator", "cpu", "--model.warmup_steps", "0",
            "--model.schedule", "constant", "--trainer.limit_val_batches", "0", "--trainer.enable_progress_bar",
            "false", *extra]


def shard(checkpoint: Path, directory: Path) -> Path:
    """`checkpoint` (a file of pretrain fit) in the layout FSDPStrategy(state_dict_type="sharded") writes: the weights
    and optimizer states through torch.distributed.checkpoint, the rest in meta.pt."""
    contents = torch.load(checkpoint, weights_only=True)
    state = {"model": contents.pop("state_dict")}
    state |= {f"optimizer_{i}": optimizer for i, optimizer in enumerate(contents.pop("optimizer_states"))}
    dcp.save(state, checkpoint_id=directory, no_dist=True)
    torch.save(contents, directory / SHARD_METADATA)
    return directory


@pytest.fixture(scope="module")
def run(tmp_path_factory) -> Path:
    """A tiny BERT (MLM + NSP heads) after 2 steps: RUN/checkpoints/last.ckpt, and RUN/sharded.ckpt, its sharded
    form."""
    tmp = tmp_path_factory.mktemp("sharded")
    assert main(fit_arguments(tmp, tmp / "run", "--trainer.max_steps", "2")) == 0
    shard(tmp / "run" / "checkpoints" / "last.ckpt", tmp / "run" / "sharded.ckpt")
    return tmp / "run"


def weights(model) -> dict[str, torch.Tensor]:
    return model.model.state_dict()


def test_a_sharded_checkpoint_loads_and_exports_as_its_file_does(run, tmp_path):
    whole, sharded = pretrain.load(run / "checkpoints" / "last.ckpt"), pretrain.load(run / "sharded.ckpt")
    assert whole.config == sharded.config and weights(whole).keys() == weights(sharded).keys()
    assert all(torch.equal(weights(whole)[k], weights(sharded)[k]) for k in weights(whole))
    assert read_checkpoint(run / "sharded.ckpt")["global_step"] == 2  # (meta.pt: everything but the tensors)
    for format in ("native", "hf"):
        process = run_cli("export", str(run / "sharded.ckpt"), str(tmp_path / format), "--format", format)
        assert process.returncode == 0, process.stderr
        exported = weights(pretrain.load(tmp_path / format))
        backbone = [k for k in weights(whole) if k.startswith("backbone.")]
        assert all(torch.equal(weights(whole)[k], exported[k]) for k in backbone)


def damaged_copies(run: Path, tmp_path: Path):
    """(name, directory, what the error says) for each way a sharded checkpoint can be incomplete."""
    def copy(name: str) -> Path:
        return Path(shutil.copytree(run / "sharded.ckpt", tmp_path / f"{name}.ckpt"))

    missing = copy("missing-shard")
    (missing / "__0_0.distcp").unlink()
    cut = copy("cut-shard")
    with open(cut / "__0_0.distcp", "r+b") as file:
        file.truncate(os.path.getsize(cut / "__0_0.distcp") // 2)
    no_index = copy("no-index")
    (no_index / ".metadata").unlink()
    meta = copy("damaged-meta")
    data = bytearray((meta / SHARD_METADATA).read_bytes())
    data[len(data) // 3: len(data) // 3 + 64] = bytes(64)
    (meta / SHARD_METADATA).write_bytes(bytes(data))
    return [(missing, "is incomplete: its shard __0_0.distcp is missing or cut short"),
            (cut, "is incomplete: its shard __0_0.distcp is missing or cut short"),
            (no_index, ".metadata, the index of this sharded checkpoint, is missing or not readable"),
            (meta, "damaged")]


def test_a_damaged_sharded_checkpoint_is_refused_in_one_line_and_nothing_is_written(run, tmp_path):
    for directory, message in damaged_copies(run, tmp_path):
        with pytest.raises(UserError, match=message):
            pretrain.load(directory)
        process = run_cli("export", str(directory), str(tmp_path / "out"))
        assert process.returncode != 0 and message in process.stderr and "Traceback" not in process.stderr
        assert not (tmp_path / "out").exists()
    (tmp_path / "plain").mkdir()
    with pytest.raises(UserError, match="is a directory, not a checkpoint"):
        check_checkpoint_file(tmp_path / "plain")


class RunsCode:
    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return os.system, (f"touch {self.marker}",)


def test_a_crafted_index_or_entry_cannot_run_code(run, tmp_path):
    marker = tmp_path / "ran"
    index = Path(shutil.copytree(run / "sharded.ckpt", tmp_path / "index.ckpt"))
    (index / ".metadata").write_bytes(pickle.dumps(RunsCode(marker)))
    with pytest.raises(UserError, match="posix.system has no place in a checkpoint index|system has no place"):
        pretrain.load(index)
    entry = tmp_path / "entry.ckpt"  # a non-tensor entry (as optimizer settings are stored) that would run code
    contents = torch.load(run / "checkpoints" / "last.ckpt", weights_only=True)
    dcp.save({"model": contents.pop("state_dict"), "optimizer_0": {"trap": RunsCode(marker)}}, checkpoint_id=entry,
             no_dist=True)
    torch.save(contents, entry / SHARD_METADATA)
    with pytest.raises(UserError, match="optimizer_0.trap holds objects other than tensors"):
        pretrain.load(entry)
    assert not marker.exists()


def test_a_sharded_checkpoint_names_the_strategy_that_resumes_it(run, tmp_path, capsys):
    with pytest.raises(UserError, match="is a sharded checkpoint: resume it with --trainer.strategy fsdp_sharded"):
        SafeCheckpointIO().load_checkpoint(run / "sharded.ckpt")
    moved = tmp_path / "run"  # a run whose last.ckpt is a sharded directory, resumed without FSDP
    (moved / "checkpoints").mkdir(parents=True)
    shutil.copytree(run / "sharded.ckpt", moved / "checkpoints" / "step-00000002.ckpt")
    os.symlink("step-00000002.ckpt", moved / "checkpoints" / "last.ckpt")
    assert resolve("last", moved / "checkpoints") == moved / "checkpoints" / "last.ckpt"
    assert "model:" in saved_recipe(moved / "checkpoints" / "last.ckpt")
    code = main(fit_arguments(run.parent, moved, "--trainer.max_steps", "3", "--ckpt_path", "last"))
    error = capsys.readouterr().err
    assert code == 2 and "resume it with --trainer.strategy fsdp_sharded" in error and "Traceback" not in error
    (moved / "checkpoints" / "step-00000002.ckpt").rename(moved / "checkpoints" / "gone")
    with pytest.raises(UserError, match="last.ckpt points to step-00000002.ckpt, which does not exist"):
        resolve("last", moved / "checkpoints")  # not "no last.ckpt yet": the run must not silently start over


# --- the callback in sharded mode -----------------------------------------------------------------------------

def full_disk() -> CheckpointException:
    """What torch.distributed.checkpoint raises when a rank's disk is full (as measured on a 1 MiB tmpfs): each
    rank's error, torch.save's RuntimeError raised while handling the OSError."""
    try:
        try:
            raise OSError(errno.ENOSPC, "No space left on device")
        except OSError:
            raise RuntimeError("[enforce fail at inline_container.cc:672] . unexpected pos 704 vs 598")  # noqa: B904
    except RuntimeError as error:
        return CheckpointException("write", {0: (error, [])})


class ShardingTrainer:
    """What Checkpoints.save reads, with a save_checkpoint that writes a directory as FSDP's sharded mode does
    (or fails half-way through, as a full disk would)."""
    sanity_checking = fast_dev_run = False
    is_global_zero = True

    def __init__(self):
        self.global_step, self.fail, self.version = 0, False, ""
        self.strategy = FSDPStrategy(state_dict_type="sharded", parallel_devices=[torch.device("cpu")])

    def save_checkpoint(self, path, weights_only=False):
        path = Path(path)
        path.mkdir(parents=True, exist_ok=True)
        (path / "__0_0.distcp").write_bytes(f"step {self.global_step}{self.version}".encode())
        if self.fail:
            raise full_disk()
        torch.save({"global_step": self.global_step}, path / SHARD_METADATA)


@pytest.mark.parametrize("keep", [0, 2])
def test_sharded_saves_keep_whole_directories_and_last_points_to_the_newest(tmp_path, keep):
    directory = tmp_path / "checkpoints"
    directory.mkdir()
    (directory / ".step-00000001.ckpt.partial").mkdir()  # what a killed save left
    trainer, callback = ShardingTrainer(), Checkpoints(str(directory), keep=keep)
    callback.setup(trainer, None, "fit")
    assert writes_sharded(trainer.strategy) and not any(directory.iterdir())
    model = torch.nn.Linear(2, 2)
    for step in (2, 4, 6):
        trainer.global_step = step
        callback.save(trainer, model)
        assert os.readlink(directory / "last.ckpt") == f"step-{step:08d}.ckpt"
        assert torch.load(directory / "last.ckpt" / SHARD_METADATA)["global_step"] == step
    expected = ["step-00000004.ckpt", "step-00000006.ckpt"] if keep == 2 else ["step-00000006.ckpt"]
    assert sorted(p.name for p in directory.iterdir()) == ["last.ckpt", *expected]
    trainer.global_step, trainer.fail = 8, True
    with pytest.raises(CheckpointWriteError, match=r"could not write .*step-00000008.ckpt: No space left on device"):
        callback.save(trainer, model)
    assert os.readlink(directory / "last.ckpt") == "step-00000006.ckpt"  # the failed save changed nothing whole
    assert (directory / "step-00000006.ckpt" / "__0_0.distcp").read_bytes() == b"step 6"
    assert sorted(p.name for p in directory.iterdir()) == ["last.ckpt", *expected]  # its staging directory is gone
    callback.setup(trainer, None, "fit")
    assert sorted(p.name for p in directory.iterdir()) == ["last.ckpt", *expected]


def test_saving_the_step_last_points_to_again_never_leaves_last_without_a_whole_checkpoint(tmp_path, monkeypatch):
    """A resumed run saves its step again (its end, or a step saved by the run it resumes from): the new directory
    takes the other name, and last.ckpt moves to it only once it is whole."""
    from pretrain.training import checkpoints

    trainer, callback = ShardingTrainer(), Checkpoints(str(tmp_path), keep=2)
    callback.setup(trainer, None, "fit")
    trainer.global_step = 6
    callback.save(trainer, torch.nn.Linear(2, 2))
    trainer.version = " again"
    resumed = Checkpoints(str(tmp_path), keep=2)

    def killed(link, target):
        raise KeyboardInterrupt  # the process dies after the new directory is whole, before the link moves

    monkeypatch.setattr(checkpoints, "point_link", killed)
    with pytest.raises(KeyboardInterrupt):
        resumed.save(trainer, torch.nn.Linear(2, 2))
    assert os.readlink(tmp_path / "last.ckpt") == "step-00000006.ckpt"
    assert (tmp_path / "last.ckpt" / "__0_0.distcp").read_bytes() == b"step 6"
    monkeypatch.undo()
    for version, name in ((" again", "step-00000006-1.ckpt"), (" thrice", "step-00000006.ckpt")):
        trainer.version = version
        Checkpoints(str(tmp_path), keep=2).save(trainer, torch.nn.Linear(2, 2))
        assert os.readlink(tmp_path / "last.ckpt") == name
        assert (tmp_path / "last.ckpt" / "__0_0.distcp").read_bytes() == f"step 6{version}".encode()
        assert sorted(p.name for p in tmp_path.iterdir()) == ["last.ckpt", name]  # one directory of step 6


# --- the wrap policy ------------------------------------------------------------------------------------------

def test_each_block_that_runs_once_is_its_own_fsdp_unit_and_shared_blocks_stay_in_the_root():
    plain = Transformer(tiny_config(num_layers=3))
    assert blocks_to_wrap(plain) == {id(b) for b in [*plain.attention_layers, *plain.ffn_layers]}
    assert blocks_to_wrap(Transformer(tiny_config(num_layers=4, sharing="all"))) == set()
    attention_shared = Transformer(tiny_config(num_layers=4, sharing="attention"))
    assert blocks_to_wrap(attention_shared) == {id(b) for b in attention_shared.ffn_layers}
    backbone = Transformer(tiny_config())
    electra = torch.nn.ModuleDict({"backbone": backbone, "rtd": ReplacedTokenDetection(MASK, SPECIAL_IDS)})
    electra["rtd"].bind(backbone)
    generator = next(m for m in electra["rtd"].modules() if isinstance(m, Transformer))
    assert {id(b) for b in generator.attention_layers} <= blocks_to_wrap(electra)
    assert {id(b) for b in backbone.ffn_layers} <= blocks_to_wrap(electra)

    strategy = fsdp_strategy("fsdp_sharded", plain)
    assert isinstance(strategy, FSDPStrategy) and writes_sharded(strategy)
    assert not writes_sharded(fsdp_strategy("fsdp", plain)) and fsdp_strategy("ddp", plain) is None
    policy = BlockWrapPolicy(blocks_to_wrap(plain))
    assert policy(plain.attention_layers[0], False, 0) and not policy(plain.embeddings, False, 0)
    assert policy(plain, True, 0)  # (recursion goes on below every module)


def test_getattr_in_an_index_reaches_enum_members_only():
    """Some Python 3.11 releases pickle an enum member as getattr(EnumClass, name): the index reader allows that and
    nothing else getattr could reach (a step towards calling anything)."""
    import io
    from pathlib import PosixPath

    from pretrain.training.checkpoints import _ShardIndexUnpickler

    class Reduced:
        def __init__(self, *args):
            self.args = args

        def __reduce__(self):
            return getattr, self.args

    crafted = pickle.dumps(Reduced(PosixPath, "__init__"))  # an admitted class, an attribute that is not a member
    with pytest.raises(pickle.UnpicklingError, match="getattr in a checkpoint index reaches only members"):
        _ShardIndexUnpickler(io.BytesIO(crafted)).load()
