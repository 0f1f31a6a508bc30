"""A run's checkpoint files: the newest two by epoch number are kept, past epoch 9999 too."""

from harness.core.checkpoint import KEEP_NEWEST, newest_in, write_checkpoint


def test_pruning_keeps_the_highest_epochs_by_number_not_by_name(tmp_path):
    for epoch in (9998, 9999, 10000, 10001):
        write_checkpoint({"epoch": epoch}, tmp_path, epoch)
    assert KEEP_NEWEST == 2
    assert sorted(p.name for p in tmp_path.iterdir()) == ["epoch-10000.pt", "epoch-10001.pt"]
    assert newest_in(tmp_path).name == "epoch-10001.pt"
