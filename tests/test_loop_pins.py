"""The project's own loop records through ImportanceRecorder: its numbers are pinned to those of the
former recorder (tracking.sgd_step with forward_tapped, commit 97d84ed), computed on this seeded
tiny data before the change. Float32; relative error <= 1e-6 (the weight and bias parts of a layer
are now scaled separately, so the last bit may differ)."""
from __future__ import annotations

import sys
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).parent))
from pins_loop import run_cnn, run_mlp, run_stacked  # noqa: E402

MLP = [[0.003706185379996896, 0.00658239284530282, 0.0028427564539015293],
       [0.0007694269879721105, 0.00073928915662691, 0.0018431171774864197],
       [0.0008894377388060093, 0.0005591597873717546, 0.0008109747432172298],
       [0.0015435523819178343, 0.003480277257040143, 0.0023011642042547464]]
CNN = [[0.002220903057605028, 0.01150493510067463, 0.0035528461448848248],
       [0.009002922102808952, 0.030982306227087975, 0.00645954767242074],
       [0.007846490480005741, 0.026802081614732742, 0.006978531368076801],
       [0.006360800936818123, 0.01994226686656475, 0.00645197369158268]]
STACKED = [[[0.003723744535818696, 0.006611690390855074, 0.0028527502436190844],
            [0.0007701991125941277, 0.0007405679789371789, 0.0018463238375261426],
            [0.0008933389908634126, 0.0005610674852505326, 0.0008119700942188501],
            [0.0015456662513315678, 0.003493513446301222, 0.0023085433058440685]],
           [[0.00016437796875834465, 0.00013509171549230814, 0.00010078913328470662],
            [0.00045141406008042395, 0.0003421329311095178, 0.0001919324422487989],
            [7.38367743906565e-05, 0.00017976797244045883, 0.00013172777835279703],
            [0.00038785822107456625, 0.00025875383289530873, 0.0002532705257181078]]]


def _close(got, pinned):
    got, pinned = np.asarray(got, dtype=np.float64), np.asarray(pinned, dtype=np.float64)
    assert got.shape == pinned.shape
    rel = np.abs(got - pinned) / np.abs(pinned)
    assert rel.max() <= 1e-6, rel.max()


def test_mlp_loop_matches_the_former_recorder():
    _close(run_mlp(), MLP)


def test_cnn_loop_matches_the_former_recorder():
    _close(run_cnn(), CNN)


def test_stacked_mlps_match_the_former_recorder():
    _close(run_stacked(), STACKED)
