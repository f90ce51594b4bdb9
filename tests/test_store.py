"""RunStore: round trip, schema rules, resume truncation, a live reader in a second process, SIGKILL."""

import os
import signal
import subprocess
import sys
import textwrap
import time

import numpy as np
import pytest
import xarray as xr

from perl.trackers.store import RunStore, StoreError

MODULES = ["q_proj", "v_proj", "down_proj"]


def snapshot(step, n_layers=2, n_sv=3, extra=False):
    """A step whose values all equal the step number, except one NaN cell (layer 1, down_proj)."""
    sv = np.full((1, n_layers, len(MODULES), n_sv), float(step))
    sv[0, 1, 2, :] = np.nan
    data = {
        "singular_values": (("step", "layer", "module", "sv"), sv, {"long_name": "singular values", "units": "1"}),
        "effective_rank": (("step", "layer", "module"), sv[..., 0].copy()),
        "finite": (("step",), np.array([True])),
        "scale": (("layer", "module"), np.full((n_layers, len(MODULES)), 0.5)),
    }
    if extra:
        data["magnitude_norm"] = (("step", "layer", "module"), np.full((1, n_layers, len(MODULES)), -float(step)))
    return xr.Dataset(
        data, coords={"step": [step], "layer": np.arange(n_layers), "module": MODULES, "sv": np.arange(n_sv)}
    )


def test_round_trip_strings_nan_attrs_and_late_variable(tmp_path):
    path = tmp_path / "logs" / "history.nc"
    store = RunStore(
        path,
        attrs={
            "peft_type": "dora",
            "target_modules": ["q_proj", "v_proj"],
            "r": 4,
            "config": {"seed": 3},
            "flag": True,
            "nothing": None,
        },
    )
    for step in (0, 5):
        store.append(snapshot(step))
    store.append(snapshot(10, extra=True))  # a variable first seen at step 10

    ds = RunStore.open(path)
    assert store.steps == [0, 5, 10] and list(ds.step.values) == [0, 5, 10]
    assert [str(m) for m in ds.module.values] == MODULES
    assert ds.attrs["peft_type"] == "dora" and list(ds.attrs["target_modules"]) == ["q_proj", "v_proj"]
    assert ds.attrs["config_json"] == {"seed": 3} and ds.attrs["flag"] == 1 and "nothing" not in ds.attrs
    assert ds.singular_values.attrs["long_name"] == "singular values"
    np.testing.assert_array_equal(ds.singular_values.sel(step=5, layer=0, module="v_proj").values, [5.0] * 3)
    assert np.isnan(ds.singular_values.sel(step=5, layer=1, module="down_proj").values).all()
    assert ds.finite.dtype == bool and ds.finite.values.all()
    assert ds.scale.dims == ("layer", "module")
    late = ds.magnitude_norm
    assert np.isnan(late.sel(step=[0, 5]).values).all() and (late.sel(step=10).values == -10).all()


def test_scalar_step_coordinate_and_reopen_continues(tmp_path):
    path = tmp_path / "s.nc"
    RunStore(path).append(snapshot(0).drop_vars("scale").isel(step=0))  # scalar step coordinate
    again = RunStore(path)
    assert again.steps == [0]
    again.append(snapshot(1).drop_vars("scale"))
    assert RunStore(path).steps == [0, 1]
    assert RunStore.open(path).effective_rank.sel(layer=0, module="q_proj").values.tolist() == [0.0, 1.0]


def test_schema_is_fixed_by_the_first_append(tmp_path):
    store = RunStore(tmp_path / "s.nc")
    store.append(snapshot(0))
    with pytest.raises(StoreError, match="not after the last stored step"):
        store.append(snapshot(0))
    with pytest.raises(StoreError, match="Dimension 'layer' has size 3"):
        store.append(snapshot(1, n_layers=3))
    with pytest.raises(StoreError, match="Coordinate 'module' differs"):
        store.append(snapshot(1).assign_coords(module=["q_proj", "k_proj", "down_proj"]))
    assert store.steps == [0] and RunStore.open(store.path).sizes["step"] == 1


def test_truncate_after_for_resume_and_finalize(tmp_path):
    store = RunStore(tmp_path / "s.nc", attrs={"peft_type": "lora"})
    for step in range(0, 50, 10):
        store.append(snapshot(step))
    store.truncate_after(25)
    assert store.steps == [0, 10, 20] and RunStore(store.path).steps == [0, 10, 20]
    store.append(snapshot(30))  # continues after the resume point
    final = store.finalize(tmp_path / "final.nc")
    ds = RunStore.open(final)
    assert list(ds.step.values) == [0, 10, 20, 30]
    assert ds.attrs["peft_type"] == "lora"
    np.testing.assert_array_equal(ds.effective_rank.sel(layer=0, module="q_proj").values, [0, 10, 20, 30])


def test_unreadable_or_missing_file_gives_a_clear_error(tmp_path):
    bad = tmp_path / "bad.nc"
    bad.write_text("not netcdf")
    with pytest.raises(StoreError, match="expected a netCDF4 file"):
        RunStore(bad)
    with pytest.raises(FileNotFoundError, match="No run store"):
        RunStore.open(tmp_path / "missing.nc")


WRITER = textwrap.dedent("""
    import sys, time
    sys.path.insert(0, {tests!r})
    from test_store import snapshot
    import perl.trackers.store as st
    import perl.trackers.store_read as sr
    import perl.trackers.store_write as sw
    from perl.trackers.store import RunStore
    for module in (st, sr, sw):  # small files fill and merge within the test
        module.BLOCK, module.MERGE = {block}, {merge}
    store = RunStore({path!r})
    for step in range({n}):
        store.append(snapshot(step, n_layers={layers}, n_sv={n_sv}))
        print(step, flush=True)
        time.sleep({pause})
""")


def _start_writer(tmp_path, n, layers=2, n_sv=3, pause=0.0, block=4, merge=3):
    script = tmp_path / "writer.py"
    path = tmp_path / "live.nc"
    script.write_text(
        WRITER.format(
            tests=os.path.dirname(__file__),
            path=str(path),
            n=n,
            layers=layers,
            n_sv=n_sv,
            pause=pause,
            block=block,
            merge=merge,
        )
    )
    proc = subprocess.Popen([sys.executable, str(script)], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    return proc, path


def _check_consistent(ds):
    steps = [int(s) for s in ds.step.values]
    assert steps == list(range(len(steps))), steps  # a prefix, no gaps, no half-written step
    values = ds.singular_values.values
    expected = np.asarray(steps, dtype=float)[:, None, None, None] * np.ones_like(values)
    expected[:, 1, 2, :] = np.nan
    np.testing.assert_array_equal(values, expected)
    return len(steps)


def test_second_process_reads_while_the_first_appends(tmp_path):
    proc, path = _start_writer(tmp_path, n=40, pause=0.01)
    seen, reads = [], 0
    try:
        while proc.poll() is None or not seen or seen[-1] < 40:
            if path.exists():
                seen.append(_check_consistent(RunStore.open(path)))
                reads += 1
            if proc.poll() is not None and path.exists() and seen and seen[-1] == 40:
                break
            if proc.poll() is not None and proc.returncode != 0:
                break
    finally:
        out, err = proc.communicate(timeout=120)
    assert proc.returncode == 0, err
    assert reads >= 3 and seen == sorted(seen)  # the reader saw the store grow, never shrink
    assert seen[-1] == 40


def test_sigkill_leaves_the_last_complete_file(tmp_path):
    proc, path = _start_writer(tmp_path, n=100000, layers=24, n_sv=64)
    printed = 0
    while printed < 8:  # let a few appends complete
        line = proc.stdout.readline()
        assert line, proc.stderr.read()
        printed += 1
    time.sleep(0.05)  # most likely inside an append now
    proc.send_signal(signal.SIGKILL)
    proc.wait(timeout=30)
    ds = RunStore.open(path)
    n = int(ds.sizes["step"])
    assert n >= 8
    steps = [int(s) for s in ds.step.values]
    assert steps == list(range(n))
    assert np.all(ds.singular_values.sel(layer=0, module="q_proj").values == np.asarray(steps)[:, None])
    # a new writer removes the killed writer's temporary and continues the store
    store = RunStore(path)
    assert not list(tmp_path.glob(".live.nc.*.tmp")) and not list(path.glob(".*.tmp"))
    store.append(snapshot(n, n_layers=24, n_sv=64))
    assert RunStore(path).steps[-1] == n


# ---------------------------------------------------------------------------- the folder layout
@pytest.fixture
def small_blocks(monkeypatch):
    """Files of 3 snapshots, merged 2 at a time, so a few appends exercise every layout rule."""
    import perl.trackers.store as st
    import perl.trackers.store_read as sr
    import perl.trackers.store_write as sw

    for module in (st, sr, sw):  # note: each module of the store holds its own reference to the sizes
        monkeypatch.setattr(module, "BLOCK", 3)
        monkeypatch.setattr(module, "MERGE", 2, raising=False)


def _files(path):
    return sorted(p.name for p in path.glob("steps_*.nc"))


def _expected_sv(steps, n_layers=2, n_sv=3):
    values = np.asarray(steps, dtype=float)[:, None, None, None] * np.ones((len(steps), n_layers, len(MODULES), n_sv))
    values[:, 1, 2, :] = np.nan
    return values


def test_small_files_fill_then_merge_and_read_back_as_one_dataset(tmp_path, small_blocks):
    store = RunStore(tmp_path / "h.nc")
    steps = list(range(0, 150, 10))  # 15 snapshots
    for step in steps:
        ds = snapshot(step, extra=step >= 70)  # a variable first seen in a later file
        ds["scale"] = ds["scale"] + step  # static: the last append wins
        store.append(ds)
    # 5 files of 3: the first 4 merged pairwise, the last one full and waiting for a partner
    assert _files(store.path) == [
        "steps_0000000000_0000000050.nc",
        "steps_0000000060_0000000110.nc",
        "steps_0000000120_0000000140.nc",
    ]
    for lazy in (False, True):
        ds = RunStore.open(store.path, lazy=lazy)
        assert [int(s) for s in ds.step.values] == steps and RunStore(store.path).steps == steps
        np.testing.assert_array_equal(ds.singular_values.values, _expected_sv(steps))
        late = ds.magnitude_norm.sel(layer=0, module="q_proj").values
        assert np.isnan(late[:7]).all() and late[7:].tolist() == [-float(s) for s in steps[7:]]
        assert float(ds.scale.sel(layer=0, module="q_proj")) == 0.5 + 140
        assert ds.finite.dtype == bool and ds.finite.values.all()
    assert hasattr(RunStore.open(store.path, lazy=True).singular_values.data, "dask")


def test_a_reader_takes_the_widest_file_where_a_merge_was_interrupted(tmp_path, small_blocks):
    store = RunStore(tmp_path / "h.nc")
    for step in range(6):
        store.append(snapshot(step))
    (merged,) = _files(store.path)
    # as if killed after the merged file was renamed in but before its small files were removed
    import perl.trackers.store as st

    for lo in (0, 3):
        part = RunStore.open(store.path).isel(step=slice(lo, lo + 3))
        st._write_file(store.path / f"steps_{lo:010d}_{lo + 2:010d}.nc", part, part.attrs)
    assert len(_files(store.path)) == 3
    ds = RunStore.open(store.path)
    assert ds.step.values.tolist() == list(range(6))
    np.testing.assert_array_equal(ds.singular_values.values, _expected_sv(range(6)))
    store = RunStore(store.path)
    store.append(snapshot(6))
    assert RunStore.open(store.path).step.values.tolist() == list(range(7))


def test_truncate_inside_a_merged_file_then_continue_and_finalize(tmp_path, small_blocks):
    store = RunStore(tmp_path / "h.nc", attrs={"peft_type": "lora"})
    for step in range(14):
        store.append(snapshot(step))
    store.truncate_after(7)  # inside the merged file of steps 6..11
    assert store.steps == list(range(8)) and RunStore(store.path).steps == list(range(8))
    assert _files(store.path) == ["steps_0000000000_0000000005.nc", "steps_0000000006_0000000007.nc"]
    for step in range(8, 12):
        store.append(snapshot(step))
    final = store.finalize(tmp_path / "final.nc")
    assert final.is_file()
    ds = RunStore.open(final)
    assert ds.step.values.tolist() == list(range(12)) and ds.attrs["peft_type"] == "lora"
    np.testing.assert_array_equal(ds.singular_values.values, _expected_sv(range(12)))
    xr.testing.assert_identical(ds, RunStore.open(store.path))
    store.clear()
    assert not store.path.exists() and store.steps == []


def test_finalize_of_a_long_store_is_written_in_slabs(tmp_path, small_blocks):
    store = RunStore(tmp_path / "h.nc")
    for step in range(20):  # more than BLOCK * MERGE = 6: the final file is written 6 steps at a time
        store.append(snapshot(step))
    ds = RunStore.open(store.finalize(tmp_path / "final.nc"))
    np.testing.assert_array_equal(ds.singular_values.values, _expected_sv(range(20)))
    assert ds.effective_rank.sel(layer=0, module="v_proj").values.tolist() == list(map(float, range(20)))


def test_a_single_file_store_of_an_older_version_is_read_and_continued(tmp_path):
    import perl.trackers.store as st

    path = tmp_path / "old.nc"
    old = xr.concat(
        [snapshot(s) for s in range(3)], dim="step", data_vars="minimal", coords="minimal", compat="override"
    )
    st._write_file(path, old, {"peft_type": "lora"})
    assert path.is_file() and RunStore(path).steps == [0, 1, 2]
    store = RunStore(path)
    store.append(snapshot(3))
    assert path.is_dir() and RunStore(path).steps == [0, 1, 2, 3]
    ds = RunStore.open(path)
    np.testing.assert_array_equal(ds.singular_values.values, _expected_sv(range(4)))
    assert ds.attrs["peft_type"] == "lora"


def test_float32_storage_and_lossless_compression(tmp_path):
    values = np.random.default_rng(0).standard_normal((1, 2, 3, 3))
    ds = snapshot(0).assign(singular_values=(("step", "layer", "module", "sv"), values))
    RunStore(tmp_path / "f32.nc", float32=True).append(ds)
    RunStore(tmp_path / "f64.nc").append(ds)
    f32, f64 = RunStore.open(tmp_path / "f32.nc"), RunStore.open(tmp_path / "f64.nc")
    assert f32.singular_values.dtype == np.float32 and f64.singular_values.dtype == np.float64
    np.testing.assert_array_equal(f32.singular_values.values, values.astype(np.float32))
    np.testing.assert_array_equal(f64.singular_values.values, values)  # lossless
    assert "float32" in f32.attrs["stored_float_precision"] and "float64" in f64.attrs["stored_float_precision"]
    # merged and final files are compressed: a constant block takes far fewer bytes than its raw values
    store = RunStore(tmp_path / "big.nc")
    big = snapshot(0, n_layers=24, n_sv=1024)
    store.append(big)
    final = store.finalize(tmp_path / "big_final.nc")
    assert final.stat().st_size < big.singular_values.nbytes / 4
    np.testing.assert_array_equal(RunStore.open(final).singular_values.values, big.singular_values.values)


def test_is_store_and_an_empty_or_foreign_folder(tmp_path):
    assert not RunStore.is_store(tmp_path)
    with pytest.raises(FileNotFoundError, match="holds no snapshots"):
        RunStore.open(tmp_path)
    store = RunStore(tmp_path / "h.nc")
    store.append(snapshot(0))
    assert RunStore.is_store(store.path) and not RunStore.is_store(store.path / "steps_0000000000_0000000000.nc")


def test_open_stacked_equals_opening_each_and_refuses_other_layouts(tmp_path):
    finals = []
    for run in range(3):
        store = RunStore(tmp_path / f"r{run}" / "h.nc", attrs={"peft_type": "lora", "seed": run})
        for step in range(4):
            ds = snapshot(step)
            store.append(ds.assign(singular_values=ds.singular_values + 100 * run))
        finals.append(store.finalize(tmp_path / f"r{run}" / "final.nc"))
    stacked = xr.decode_cf(RunStore.open_stacked(finals))
    want = xr.concat(
        [RunStore.open(f) for f in finals],
        dim="run",
        data_vars="all",
        coords="minimal",
        compat="override",
        combine_attrs="drop_conflicts",
    )
    assert hasattr(stacked.singular_values.data, "dask")
    xr.testing.assert_identical(stacked.load(), want)
    assert stacked.attrs["peft_type"] == "lora" and "seed" not in stacked.attrs  # differing attrs dropped
    cell = stacked.singular_values.isel(run=2).sel(layer=0, module="v_proj").values
    np.testing.assert_array_equal(cell, 200 + np.arange(4)[:, None] * np.ones((4, 3)))
    # another layout (more steps), or a live store folder: None, the caller opens them one by one
    store = RunStore(tmp_path / "r3" / "h.nc")
    for step in range(5):
        store.append(snapshot(step))
    assert RunStore.open_stacked([*finals, store.finalize(tmp_path / "r3" / "final.nc")]) is None
    assert RunStore.open_stacked([finals[0], store.path]) is None


def test_a_lazy_reader_still_reads_files_the_writer_merged_or_continued_since(tmp_path, small_blocks):
    store = RunStore(tmp_path / "h.nc")
    for step in range(5):  # files: 0..2 (full), 3..4 (filling)
        store.append(snapshot(step))
    lazy = RunStore.open(store.path, lazy=True)
    assert hasattr(lazy.singular_values.data, "dask")
    for step in range(5, 12):  # 3..4 is continued and renamed, then everything is merged
        store.append(snapshot(step))
    assert not (store.path / "steps_0000000003_0000000004.nc").exists()
    np.testing.assert_array_equal(lazy.singular_values.values, _expected_sv(range(5)))
    assert lazy.effective_rank.sel(layer=0, module="q_proj").values.tolist() == [0.0, 1.0, 2.0, 3.0, 4.0]


def test_a_lazy_reader_whose_handles_were_closed_reads_the_steps_where_they_are_now(tmp_path, small_blocks):
    from perl import ncfiles

    store = RunStore(tmp_path / "h.nc")
    for step in range(5):
        store.append(snapshot(step))
    lazy = RunStore.open(store.path, lazy=True)
    for step in range(5, 12):  # the files listed above are merged away
        store.append(snapshot(step))
    ncfiles.close_all()  # as when more files were read since than stay open
    np.testing.assert_array_equal(lazy.singular_values.values, _expected_sv(range(5)))
    store.truncate_after(1)  # a resume removed steps 2..4: a clear error, not old or wrong values
    ncfiles.close_all()
    with pytest.raises(StoreError, match="were removed"):
        lazy.singular_values.load()


def test_reading_a_cell_opens_each_file_once(tmp_path, small_blocks, monkeypatch):
    """A read opens a file once, whatever the number of variables (it opened it per variable and
    chunk: 95% of the time of one cell of a 10,000-snapshot live store); the reader, an eager read
    and the writer share one handle per file."""
    import netCDF4

    from perl import ncfiles

    store = RunStore(tmp_path / "h.nc")
    for step in range(14):
        store.append(snapshot(step, extra=True))
    files = _files(store.path)
    assert len(files) == 3
    ncfiles.close_all()
    opened = []
    real = netCDF4.Dataset

    def counting(path, mode="r", *args, **kwargs):
        name = os.path.basename(str(path))
        if mode == "r" and not name.startswith("."):  # note: not the writer's own new files
            opened.append(name)
        return real(path, mode, *args, **kwargs)

    monkeypatch.setattr(netCDF4, "Dataset", counting)
    lazy = RunStore.open(store.path, lazy=True)
    cell = lazy.sel(layer=0, module="q_proj").load()
    assert cell.effective_rank.values.tolist() == list(map(float, range(14)))
    assert cell.magnitude_norm.values.tolist() == [-float(s) for s in range(14)]
    RunStore.open(store.path)  # an eager read and the writer's own reads share the handles too
    store.append(snapshot(14, extra=True))
    assert sorted(opened) == sorted(set(opened)) and set(files) <= set(opened)
    assert ncfiles.open_count() == len(set(opened))  # the writer's reads closed what they opened
    lazy.close()  # a lazily opened store holds its files until closed, as xarray's own do
    assert ncfiles.open_count() == 0
    np.testing.assert_array_equal(lazy.singular_values.values, _expected_sv(range(14)))  # opened again


def test_a_small_file_is_compressed_once_full_and_read_back_the_same(tmp_path, small_blocks):
    import netCDF4

    store = RunStore(tmp_path / "h.nc", float32=True)
    steps = list(range(5))
    for step in steps:  # files: 0..2 (full), 3..4 (filling)
        big = snapshot(step, n_layers=4, n_sv=256)
        big["singular_values"] = big.singular_values.fillna(0.0) + np.arange(256) % 7  # compressible
        store.append(big)
    full, filling = _files(store.path)

    def zlib(name):
        with netCDF4.Dataset(store.path / name) as nc:
            return nc.variables["singular_values"].filters()["zlib"]

    assert (full, filling) == ("steps_0000000000_0000000002.nc", "steps_0000000003_0000000004.nc")
    assert zlib(full) and not zlib(filling)  # the filling one is appended to in place
    assert (store.path / full).stat().st_size < (store.path / filling).stat().st_size
    ds = RunStore.open(store.path)
    expected = np.asarray(steps, float)[:, None, None, None] + np.arange(256) % 7
    expected = np.broadcast_to(expected, (5, 4, len(MODULES), 256)).copy()
    expected[:, 1, 2, :] = np.arange(256) % 7
    np.testing.assert_array_equal(ds.singular_values.values, expected.astype(np.float32))
    store.append(snapshot(5, n_layers=4, n_sv=256))  # fills 3..5: compressed too, then merged with 0..2
    assert _files(store.path) == ["steps_0000000000_0000000005.nc"]
    assert RunStore.open(store.path).step.values.tolist() == list(range(6))


def test_a_reader_thread_and_the_writer_in_one_process(tmp_path, small_blocks):
    """A notebook that trains and reads in one kernel: the writer appends (merging and compressing
    files) while another thread reads the store lazily; every read is a consistent prefix."""
    import threading

    path, n = tmp_path / "live.nc", 40
    store = RunStore(path)
    store.append(snapshot(0))
    seen, errors, done = [], [], threading.Event()

    def read():
        try:
            while not done.is_set():
                ds = RunStore.open(path, lazy=True)
                seen.append(_check_consistent(ds.load()))
                ds.close()
        except Exception as err:  # noqa: BLE001 - reported by the assertion below
            errors.append(err)

    reader = threading.Thread(target=read)
    reader.start()
    for step in range(1, n):
        store.append(snapshot(step))
    done.set()
    reader.join(timeout=120)
    assert not errors and not reader.is_alive()
    assert len(seen) >= 2 and seen == sorted(seen)
    assert _check_consistent(RunStore.open(path)) == n


def test_a_one_off_read_closes_what_it_opened_even_when_the_cache_is_full(tmp_path, monkeypatch):
    from perl import ncfiles

    ncfiles.close_all()
    monkeypatch.setattr(ncfiles, "MAX_OPEN", 1)
    a, b = tmp_path / "a.nc", tmp_path / "b.nc"
    RunStore(a).append(snapshot(0))
    RunStore(b).append(snapshot(0))
    first_a = sorted(a.glob("steps_*.nc"))[0]
    first_b = sorted(b.glob("steps_*.nc"))[0]
    with ncfiles.reading(first_a):  # kept: the cache is full
        pass
    with ncfiles.reading(first_b, keep=False) as handle:  # opening it evicts a's
        assert handle.nc.variables["step"][:].tolist() == [0]
    assert ncfiles.open_count() == 0  # b's is closed too, as keep=False promises
