"""simclr_keras.callbacks: the pieces of the training log a resumed run relies on.

The callbacks at work in a run (logging, checkpoints, signals, non-finite stops) are tested through
the training command in tests/test_train_cli.py and tests/test_faults.py.
"""

from simclr_keras import callbacks


def test_drop_partial_last_line(tmp_path):
    path = tmp_path / "log.jsonl"
    assert callbacks.drop_partial_last_line(str(path)) == ""  # missing
    path.write_text('{"step": 1}\n{"step": 2}\n{"st')
    assert callbacks.drop_partial_last_line(str(path)) == '{"st'
    assert path.read_text() == '{"step": 1}\n{"step": 2}\n'
    assert callbacks.drop_partial_last_line(str(path)) == ""
    path.write_text('{"st')
    callbacks.drop_partial_last_line(str(path))
    assert path.read_text() == ""
