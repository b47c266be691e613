"""Campaigns: every command of the fair comparison's plan passes its command line's checks, the
carried choices match their tunings, later steps are decided only when reached, a failing step
stops the campaign, and a stop signal reaches the running step."""

import io
import json
import os
import shutil
import signal
import subprocess
import sys
import time

import pytest

from experiments import campaign as campaign_cli, pretrain as pretrain_cli
from experiments import study as study_cli, tune as tune_cli
from idm_jax.runs import campaign, cli, plans

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CLIS = {"experiments.study": study_cli, "experiments.tune": tune_cli,
        "experiments.pretrain": pretrain_cli}


class Reached(Exception):
    """Raised where a command would start reading data: its checks before that all passed."""


def table(*variants, seeds=2):
    """A comparison record as ``experiments.tune --compare`` writes it, every row on ``seeds``,
    validation falling with the rank."""
    return {"table": [{"variant": v, "seeds": seeds, "validation_mean": 50.0 - rank}
                      for rank, v in enumerate(variants)]}


def expand(items):
    return [s for item in items for s in (item.make() if isinstance(item, campaign.Later)
                                          else [item])]


@pytest.fixture
def fair(tmp_path):
    """The fair-cifar10 plan in ``tmp_path`` with an IPC 10 table whose best rows are a tuned
    method and a study row, and the project's recorded IDM tuning (the source of a carry)."""
    runs = tmp_path / "runs"
    os.makedirs(runs / "tune-ipc10")
    (runs / "tune-ipc10" / "comparison.json").write_text(json.dumps(table(
        "random-real-pf4 (study)", "ncfm", "idm (study)", "pf4 (study)", "iid")))
    shutil.copytree(os.path.join(REPO, "docs", "study", "tune-ipc1", "idm"),
                    runs / "tune-ipc1" / "idm")
    return str(runs), campaign.PLANS["fair-cifar10"](str(runs), "npy", str(tmp_path / "data"))


def test_every_command_of_the_fair_plan_passes_its_checks_before_reading_data(fair, monkeypatch):
    runs, items = fair
    monkeypatch.setattr(cli, "enable_compilation_cache", lambda: None)

    def reached(*args, **kwargs):
        raise Reached

    monkeypatch.setattr(cli, "load_data", reached)
    monkeypatch.setattr(pretrain_cli.data, "load_dataset", reached)
    steps = expand(items)
    assert len(steps) == len(items) - 1 + 3           # the third seeds: idm, ncfm and pf4
    for step in steps:
        if "--table_only" in step.argv:               # runs nothing: table the project's records
            argv = list(step.argv)
            where = argv.index("--workdir") + 1
            records = os.path.join(runs, "records", os.path.basename(argv[where]))
            shutil.copytree(os.path.join(REPO, "docs", "study", os.path.basename(argv[where])),
                            records)
            argv[where] = records
            rows = CLIS[step.module].main(argv)
            assert {row["variant"] for row in rows} >= {"idm", "pf4", "random-real"}
            continue
        if "--compare" in step.argv:                  # runs nothing; needs finished records
            args = tune_cli._parser().parse_args(step.argv)
            tune_cli._refuse_unused_flags(args)
            continue
        if "--carry_from" in step.argv and "idm" not in step.argv:
            continue                                  # no recorded tuning to carry: next test
        with pytest.raises(Reached):
            CLIS[step.module].main(list(step.argv))


def test_each_carried_choice_has_its_tunings_split_budget_and_pool(fair):
    runs, items = fair
    steps = expand(items)
    parser = tune_cli._parser()
    tunes = {a.method: a for a in (parser.parse_args(s.argv) for s in steps
                                   if s.module == "experiments.tune" and "--compare" not in s.argv
                                   and "--carry_from" not in s.argv)}
    assert sorted(tunes) == sorted(plans.METHODS)
    carried = [parser.parse_args(s.argv) for s in steps if "--carry_from" in s.argv]
    assert {a.method for a in carried} == set(plans.METHODS)
    for args in carried:
        tuned = tunes[args.method]
        assert args.carry_from == tuned.workdir
        assert (args.validation_per_class, args.budget, args.dataset, args.set) == (
            tuned.validation_per_class, tuned.budget, tuned.dataset, tuned.set), args.method
        assert args.ipc == 10 and tuned.ipc == 1
    pools = {os.path.basename(s.argv[s.argv.index("--out") + 1]): s for s in steps
             if s.module == "experiments.pretrain"}
    for method in ("ncfm", "iid"):      # each pool is made before its tuning reads it
        made = steps.index(pools[f"cifar10-{method}-val500"])
        assert any(f"cifar10-{method}-val500" in a for a in tunes[method].set)
        tune_step = next(s for s in steps if "--method" in s.argv and method in s.argv
                         and "--carry_from" not in s.argv)
        assert made < steps.index(tune_step)


def test_every_carry_and_table_comes_after_the_steps_whose_outputs_it_reads(fair):
    _, items = fair
    labels = [item.label for item in items]

    def at(label):
        return labels.index(label)

    for m in plans.METHODS:
        assert at(f"tune {m} at IPC 1") < at(f"carry {m}'s IPC 1 choice to IPC 10, seeds 0,1")
    runs = [n for n, item in enumerate(items) if isinstance(item, campaign.Step)
            and "--table_only" not in item.argv and "--compare" not in item.argv]
    assert max(runs) < at("the IPC 1 table") < at("the IPC 10 table")
    third = next(n for n, item in enumerate(items) if isinstance(item, campaign.Later))
    assert at("the IPC 10 table") < third < at("the IPC 10 table with the third seeds")


def test_the_third_seeds_go_to_idm_and_the_two_best_rows_that_are_not_baselines(fair):
    runs, items = fair
    later = next(i for i in items if isinstance(i, campaign.Later))
    steps = later.make()
    assert [s.label for s in steps] == [
        "IPC 10 study: idm, seeds 2",
        "carry ncfm's IPC 1 choice to IPC 10, seeds 0,1,2",
        "IPC 10 study: pf4, seeds 2"]
    assert "pool_dir=" + os.path.join(runs, "pools", "cifar10-ncfm-val500") in steps[1].argv
    # A re-run after some third seeds changed the table keeps the first pick.
    with open(os.path.join(runs, "tune-ipc10", "comparison.json"), "w") as f:
        json.dump(table("m3d", "dm", "idm (study)"), f)
    assert [s.label for s in later.make()] == [s.label for s in steps]
    assert plans.top_rows(table("random-real (study)", "idm (study)")["table"]) == []
    # The table is ranked on test accuracy, the pick on validation.
    by_test = table("m3d", "random-real (study)", "dm", "pf3 (study)", "pf4 (study)")["table"]
    for row, validation in zip(by_test, (41.0, 60.0, 43.5, 43.5, 42.0)):
        row["validation_mean"] = validation
    assert plans.top_rows(by_test) == ["dm", "pf3 (study)"]
    # A re-run of the whole plan: the picked method's first carry keeps its third seed (a carry
    # writes its tuning record from the seeds it is given), the others stay on two.
    again = campaign.PLANS["fair-cifar10"](runs, "npy", "data")
    carries = {a.method: a.test_seeds for a in (tune_cli._parser().parse_args(s.argv)
                                                for s in again if isinstance(s, campaign.Step)
                                                and "--carry_from" in s.argv)}
    assert carries == {"idm": "0,1", "m3d": "0,1", "dm": "0,1", "ncfm": "0,1,2", "iid": "0,1"}


def test_a_later_step_is_decided_when_reached_and_a_failure_stops_the_campaign():
    ran, decided = [], []

    def runner(step):
        ran.append(step.label)
        return 3 if step.label == "c" else 0

    def decide():
        decided.append(list(ran))          # what had run when the decision was made
        return [campaign.Step("c", "m", ()), campaign.Step("d", "m", ())]

    items = [campaign.Step("a", "m", ()), campaign.Step("b", "m", ()),
             campaign.Later("later", decide), campaign.Step("e", "m", ())]
    with pytest.raises(campaign.CampaignStopped, match=r"step 3.1 \(c\) failed with status 3"):
        campaign.run(items, runner=runner, log=lambda line: None)
    assert decided == [["a", "b"]] and ran == ["a", "b", "c"]


SLOW_STEP = """
import os, signal, sys, time
def stop(signum, frame):     # says so at length, then ends its work anyway: the campaign stops
    for line in range(2000):
        print("saving", line, flush=True)
    open({mark!r}, "a").write(signal.Signals(signum).name)
    sys.exit(0)
for s in (signal.SIGTERM, signal.SIGINT):
    signal.signal(s, stop)
open({pid!r}, "w").write(str(os.getpid()))
open({mark!r}, "w").write("started ")
time.sleep(60)
"""

CAMPAIGN = """
import sys
from idm_jax.runs import campaign
try:
    campaign.run([campaign.Step("slow", "slow_step", ()), campaign.Step("never", "slow_step", ())])
except campaign.CampaignStopped as stopped:
    try:
        print(stopped)
    except OSError:          # a closed terminal
        pass
    sys.exit(stopped.status)
"""


@pytest.fixture
def slow_campaign(tmp_path):
    """``start(**popen)``: a campaign of two slow steps in its own process group, returned once
    its first step has started, with the file its steps write the signals they get to. Any
    step still running at the end is killed."""
    mark, pid = tmp_path / "mark", tmp_path / "step.pid"
    (tmp_path / "slow_step.py").write_text(SLOW_STEP.format(mark=str(mark), pid=str(pid)))
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(tmp_path), REPO]))

    def default_signals():
        # pytest itself may run in the background or under nohup, where SIGINT or SIGHUP is
        # ignored and a child inherits that: each test sets the dispositions it means to test.
        for number in (signal.SIGINT, signal.SIGHUP):
            signal.signal(number, signal.SIG_DFL)

    def start(**popen):
        popen = {"stdout": subprocess.PIPE, "stderr": subprocess.PIPE,
                 "preexec_fn": default_signals, **popen}
        proc = subprocess.Popen([sys.executable, "-c", CAMPAIGN], cwd=REPO, env=env, text=True,
                                start_new_session=True, **popen)
        deadline = time.time() + 60
        while not (mark.exists() and mark.read_text()) and time.time() < deadline:
            time.sleep(0.1)
        assert mark.exists(), "the first step did not start within 60 s"
        return proc, mark
    yield start
    if pid.exists():
        try:
            os.kill(int(pid.read_text()), signal.SIGKILL)
        except ProcessLookupError:
            pass


@pytest.mark.parametrize("sent, to_group, step_gets", [
    (signal.SIGTERM, False, "SIGTERM"),     # a scheduler's preemption
    (signal.SIGINT, True, "SIGINT"),        # Ctrl-C: the terminal signals the whole group
    (signal.SIGHUP, False, "SIGTERM"),      # the terminal closed
], ids=["SIGTERM", "Ctrl-C to the group", "SIGHUP"])
def test_a_stop_signal_reaches_the_running_step_once_and_is_the_campaigns_status(
        slow_campaign, sent, to_group, step_gets):
    proc, mark = slow_campaign()
    if to_group:
        os.killpg(proc.pid, sent)
    else:
        proc.send_signal(sent)
    out, err = proc.communicate(timeout=60)
    assert mark.read_text() == f"started {step_gets}"   # passed on once; the second never ran
    assert proc.returncode == 128 + sent, err
    assert f"step 1 (slow) was stopped by {signal.Signals(sent).name}" in out
    assert out.count("== ") == 1


def test_a_closed_terminal_stops_the_step_which_can_still_finish_its_writes(slow_campaign):
    import pty
    terminal, side = pty.openpty()
    proc, mark = slow_campaign(stdout=side, stderr=side)
    os.close(side)
    os.close(terminal)                       # every later write to it fails (EIO)
    proc.send_signal(signal.SIGHUP)
    assert proc.wait(timeout=60) == 128 + signal.SIGHUP
    assert mark.read_text() == "started SIGTERM"     # its 2000 lines did not kill it


class Terminal:
    """A stand-in for sys.stdout / sys.stderr that says whether it is a terminal and keeps
    the bytes relayed to it."""

    def __init__(self, tty):
        self.tty, self.buffer = tty, io.BytesIO()

    def isatty(self):
        return self.tty

    def write(self, text):
        self.buffer.write(text.encode())

    def flush(self):
        pass


@pytest.mark.parametrize("err_tty", [True, False], ids=["both terminals", "stderr a file"])
def test_a_step_s_streams_are_relayed_each_to_its_own_and_only_where_a_terminal(
        tmp_path, monkeypatch, capfd, err_tty):
    (tmp_path / "two_streams.py").write_text(
        "import sys\nprint('to-out')\nprint('to-err', file=sys.stderr)\n")
    out, err = Terminal(True), Terminal(err_tty)
    monkeypatch.setattr(sys, "stdout", out)
    monkeypatch.setattr(sys, "stderr", err)
    assert campaign.run_step(campaign.Step("two", "two_streams", ()), root=str(tmp_path)) == 0
    monkeypatch.undo()
    assert out.buffer.getvalue().decode().split() == ["to-out"]
    written = capfd.readouterr()              # what the step wrote itself, not relayed
    if err_tty:
        assert err.buffer.getvalue().decode().split() == ["to-err"] and not written.err
    else:
        assert err.buffer.getvalue() == b"" and written.err.split() == ["to-err"]


def test_a_campaign_started_under_nohup_ignores_the_hangup(slow_campaign):
    def under_nohup():
        signal.signal(signal.SIGINT, signal.SIG_DFL)
        signal.signal(signal.SIGHUP, signal.SIG_IGN)
    proc, mark = slow_campaign(preexec_fn=under_nohup)
    proc.send_signal(signal.SIGHUP)
    time.sleep(1)
    assert proc.poll() is None and mark.read_text() == "started "
    proc.send_signal(signal.SIGTERM)
    proc.communicate(timeout=60)
    assert mark.read_text() == "started SIGTERM"


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="PR_SET_PDEATHSIG is Linux's")
def test_a_campaign_killed_outright_takes_its_running_step_with_it(slow_campaign):
    proc, mark = slow_campaign(stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    proc.kill()
    proc.wait(timeout=60)
    deadline = time.time() + 30
    while mark.read_text() == "started " and time.time() < deadline:
        time.sleep(0.1)
    assert mark.read_text() == "started SIGTERM"


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="the launcher is Linux's")
def test_the_launcher_leaves_a_ctrl_c_before_its_exec_to_the_kernel():
    # Python's own SIGINT handler only sets a flag, which the exec would drop: a Ctrl-C passed
    # on in that moment would be lost and the step would run on. The kernel's default ends it.
    head = campaign._STOP_WITH_PARENT.split("os.execv")[0]
    probe = head + "print(signal.getsignal(signal.SIGINT) == signal.SIG_DFL)\n"
    out = subprocess.run([sys.executable, "-c", probe, str(os.getpid())], text=True,
                         capture_output=True, timeout=60,
                         preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
    assert out.stdout.split() == ["True"], out.stderr


def test_a_step_killed_by_a_signal_is_named_as_killed():
    killed = campaign.CampaignStopped("4", campaign.Step("big", "m", ()), 128 + signal.SIGKILL)
    assert "step 4 (big) was killed by SIGKILL" in str(killed) and not killed.requested
    stopped = campaign.CampaignStopped("4", campaign.Step("big", "m", ()), 128 + signal.SIGTERM)
    assert "was stopped by SIGTERM" in str(stopped) and stopped.requested
    failed = campaign.CampaignStopped("4", campaign.Step("big", "m", ()), 2)
    assert "failed with status 2" in str(failed) and not failed.requested


def test_the_command_line_refuses_bad_flags_with_one_error_line_and_prints_a_dry_run(
        tmp_path, capsys):
    (tmp_path / "a_file").write_text("")
    cases = [(["--plan", "nope", "--data_dir", str(tmp_path)], "--plan 'nope'"),
             ([], "--data_dir"),
             (["--data_dir", str(tmp_path / "missing")], "no such folder"),
             (["--data_dir", str(tmp_path), "--workdir", str(tmp_path / "a_file")], "is a file"),
             (["--data_dir", str(tmp_path), "--skip_steps", "3,x"], "'x' is not a step number"),
             (["--data_dir", str(tmp_path), "--skip_steps", "1-99"], "outside the plan's steps"),
             (["--data_dir", str(tmp_path), "--skip_steps", "5-4"], "an empty range"),
             (["--data_dir", str(tmp_path), "--skip_steps", "3-"], "'3-' is not a step number"),
             (["--data_dir", str(tmp_path), "--source", "nope"], "--source 'nope' is not known")]
    for argv, words in cases:
        with pytest.raises(SystemExit) as exit_:
            campaign_cli.main(argv)
        err = capsys.readouterr().err.splitlines()
        assert exit_.value.code == 2 and len(err) == 1 and err[0].startswith("error:"), err
        assert words in err[0]
    assert campaign_cli.main(["--data_dir", str(tmp_path), "--workdir",
                              str(tmp_path / "runs"), "--dry_run"]) == 0
    out = capsys.readouterr().out
    assert "24 steps" in out and "experiments.tune --method iid" in out
    assert not os.path.exists(tmp_path / "runs")        # a dry run makes nothing


def record(directory, name="results.json"):
    os.makedirs(directory, exist_ok=True)
    with open(os.path.join(directory, name), "w") as f:
        f.write("{}")


def test_a_steps_time_left_is_its_estimate_scaled_by_the_runs_not_yet_recorded():
    def step(recorded, expected):
        return campaign.Step("s", "m", (), 40.0, lambda: (recorded, expected))
    assert campaign.minutes_left(step(1, 4)) == pytest.approx(30.0)
    assert campaign.minutes_left(step(4, 4)) == 0.0
    assert campaign.minutes_left(step(6, 4)) == 0.0          # more on disk than expected
    assert campaign.minutes_left(step(0, 0)) == 40.0         # cannot tell: the whole estimate
    assert campaign.minutes_left(campaign.Step("s", "m", (), 40.0)) == 40.0
    assert campaign.minutes_left(campaign.Later("l", list, 25.0)) == 25.0
    assert campaign.minutes_left(campaign.Later("l", list, 25.0, lambda: (1, 5))) == 20.0


def test_the_dry_run_says_what_each_step_has_left_from_the_records_on_disk(fair):
    runs, _ = fair                  # holds the project's finished IDM tuning (10 trials, 2 tests)
    study1 = os.path.join(runs, "cpu-ipc1")
    record(os.path.join(study1, "idm", "seed1"))
    record(os.path.join(study1, "pf4", "seed1"), "failed.json")        # ended: counts
    os.makedirs(os.path.join(study1, "ce-only", "seed1", "checkpoints"))  # running: does not
    m3d = os.path.join(runs, "tune-ipc1", "m3d")
    for k in range(11):                                  # the grid and one point past its edge
        record(os.path.join(m3d, f"lr_img={k}", "seed100"))
    record(os.path.join(m3d, "chosen", "seed0"))
    record(os.path.join(m3d, "chosen-lr_img=1.581", "seed1"))   # an old choice, set aside
    record(os.path.join(m3d, "lr_img=1", "seed0"))              # not the trial seed
    record(os.path.join(runs, "pools", "cifar10-ncfm-val500"), "pool.json")
    items = campaign.PLANS["fair-cifar10"](runs, "npy", "data")
    text = campaign.describe(items)
    assert "[done] tune idm at IPC 1" in text
    assert "[done] ncfm's pool" in text
    assert "[2 of 4 runs recorded, about 75 min left] IPC 1 study: ce-only,ce-only-pf4,idm," \
           "pf4, seeds 1" in text
    assert "[12 of 13 runs recorded, about 5 min left] tune m3d at IPC 1" in text
    assert "[30 min] tune dm at IPC 1" in text                     # nothing recorded
    M = plans.MINUTES
    from_scratch = sum(item.minutes for item in items)
    done = (M["tune-idm"] + M["pool-ncfm"] + M["ipc1-baselines"] / 2
            + M["tune-m3d"] * 12 / 13)
    assert sum(map(campaign.minutes_left, items)) == pytest.approx(from_scratch - done)
    assert text.splitlines()[-1].startswith(
        f"24 steps, about {from_scratch / 60:.1f} h from scratch on 2 CPU cores, about "
        f"{(from_scratch - done) / 60:.1f} h left by the run records found")


def test_a_pool_is_made_only_while_a_run_that_reads_it_is_left(fair):
    runs, _ = fair
    ncfm = os.path.join(runs, "tune-ipc1", "ncfm")
    for k in range(10):
        record(os.path.join(ncfm, f"lr_img={k}", "seed100"))
    for where in ("tune-ipc1", "tune-ipc10"):
        for seed in (0, 1):
            record(os.path.join(runs, where, "ncfm", "chosen", f"seed{seed}"))

    def pools():
        items = campaign.PLANS["fair-cifar10"](runs, "npy", "data")
        return items, {m: next(i for i in items if i.label == f"{m}'s pool of pretrained "
                               f"extractors") for m in ("ncfm", "iid")}

    items, pool = pools()
    assert not pool["ncfm"].wanted() and pool["iid"].wanted()
    assert campaign.minutes_left(pool["ncfm"]) == 0.0
    assert "[not needed: what it makes is read only by finished steps] ncfm's pool" in \
        campaign.describe(items)
    ran = []
    campaign.run(items[:items.index(pool["iid"]) + 1], runner=lambda s: ran.append(s) or 0,
                 log=lambda line: None)
    assert pool["ncfm"] not in ran and pool["iid"] in ran and len(ran) == len(
        items[:items.index(pool["iid"]) + 1]) - 1
    os.remove(os.path.join(runs, "tune-ipc10", "ncfm", "chosen", "seed1", "results.json"))
    assert pools()[1]["ncfm"].wanted()                 # a carry left to run reads the pool
    # A reader whose records cannot tell what it has left is never taken as finished.
    for unknown in (campaign.Step("s", "m", ()), campaign.Step("s", "m", (), 1, lambda: (0, 0))):
        assert not plans._finished(unknown)


def test_a_tuning_whose_every_setting_failed_is_done_without_its_test_seeds(fair):
    runs, _ = fair
    dm = os.path.join(runs, "tune-ipc1", "dm")
    for k in range(10):
        record(os.path.join(dm, f"lr_img={k}", "seed100"), "failed.json")
    describe = lambda: campaign.describe(campaign.PLANS["fair-cifar10"](runs, "npy", "data"))
    assert "[10 of 12 runs recorded, about 5 min left] tune dm at IPC 1" in describe()
    with open(os.path.join(dm, "tuning.json"), "w") as f:       # the grid's record: no choice
        json.dump({"grid": [{"failed": "the loss became nan"}] * 10}, f)
    assert "[done] tune dm at IPC 1" in describe()


def test_an_unreadable_or_partial_comparison_stops_the_third_seed_step_and_keeps_no_pick(fair):
    runs, items = fair
    later = next(i for i in items if isinstance(i, campaign.Later))
    path = os.path.join(runs, "tune-ipc10", "comparison.json")
    kept = os.path.join(runs, "tune-ipc10", "third-seeds.json")
    cases = [("{not json", "not JSON"), (json.dumps({"rows": []}), "no comparison table"),
             (json.dumps({"table": [3]}), "no comparison table"),
             (json.dumps(table("m3d", "idm (study)")), "fewer than 2 rows"),
             (json.dumps(dict(table("m3d", "dm"), header={"missing": ["iid"], "failed": {}})),
              "not finished: iid"),
             (json.dumps(dict(table("m3d", "dm"), header={"missing": [], "failed": {},
                                                          "stale": {"ncfm": "carry again"}})),
              "not finished: ncfm")]
    blind = table("m3d", "dm", "random-real (study)")
    blind["table"][1]["validation_mean"] = None
    del blind["table"][2]["validation_mean"]          # a baseline's is not needed
    cases += [(json.dumps(dict(table("m3d", "dm"), header=None)), "no comparison table"),
              (json.dumps(blind), r"no validation accuracy for dm;"),
              (json.dumps({"table": table("m3d", "dm")["table"]
                           + table("pf4 (study)", seeds=1)["table"]}),
               r"not finished: pf4 \(study\) \(not on 2 seeds\)")]
    for text, words in cases:
        with open(path, "w") as f:
            f.write(text)
        with pytest.raises(campaign.PlanError, match=words):
            later.make()
        assert not os.path.exists(kept)
    os.remove(path)
    with pytest.raises(campaign.PlanError, match="No such file.*step before this one"):
        later.make()
    for rows in ('"ncfm"', '["ncfm"]', '["ncfm", "ncfm"]', '["ncfm", "nope"]', '[["ncfm"], "dm"]',
                 '["ncfm", "random-real-pf4 (study)"]', '["ncfm", "idm (study)"]'):
        with open(kept, "w") as f:
            f.write('{"rows": %s}' % rows)
        with pytest.raises(campaign.PlanError, match="third-seeds.json: not 2 distinct rows"):
            later.make()
        assert later.progress() == (0, 0)       # the dry run cannot tell; the step says why


def test_the_dry_run_counts_the_third_seeds_once_picked_and_marks_them_done(fair):
    runs, items = fair
    later = next(i for i in items if isinstance(i, campaign.Later))
    number = items.index(later) + 1
    line = lambda: next(l for l in campaign.describe(items).splitlines()
                        if l.startswith(f"{number:>3}."))
    assert later.progress() == (0, 0)
    assert line().endswith("(its commands are decided when the campaign gets there)")
    assert f"[{plans.MINUTES['third-seeds'] / 60:.1f} h]" in line()
    later.make()                                       # picks ncfm and pf4 (study), kept
    assert later.progress() == (0, 5)                  # idm and pf4 at seed 2, ncfm at 0, 1, 2
    for directory in (os.path.join("cpu-ipc10", "idm", "seed2"),
                      os.path.join("cpu-ipc10", "pf4", "seed2"),
                      os.path.join("tune-ipc10", "ncfm", "chosen", "seed0")):
        record(os.path.join(runs, directory))
    assert later.progress() == (3, 5)
    assert "[3 of 5 runs recorded, about 72 min left]" in line()
    for seed in (1, 2):
        record(os.path.join(runs, "tune-ipc10", "ncfm", "chosen", f"seed{seed}"), "failed.json")
    assert line().startswith(f"{number:>3}. [done]") and line().endswith("are decided)")
    assert campaign.minutes_left(later) == 0.0


@pytest.fixture
def toy_plan(tmp_path, monkeypatch):
    """A registered plan of real commands: copy a JSON file, fail on a broken one, then a later
    step that cannot decide. Returns the copy's path."""
    good, bad, copy = tmp_path / "good.json", tmp_path / "bad.json", tmp_path / "copy.json"
    good.write_text('{"a": 1}')
    bad.write_text("{broken")

    def undecidable():
        raise campaign.PlanError("results.json: missing")

    def build(workdir, source, data_dir):
        return [campaign.Step("copy", "json.tool", (str(good), str(copy))),
                campaign.Step("broken", "json.tool", (str(bad),)),
                campaign.Later("decide", undecidable)]
    monkeypatch.setitem(campaign.PLANS, "toy", build)
    return copy


def test_the_command_line_runs_a_plan_and_stops_at_a_failing_step_with_one_error_line(
        toy_plan, tmp_path, capfd):
    base = ["--plan", "toy", "--data_dir", str(tmp_path), "--workdir", str(tmp_path / "w")]
    cases = [([], 1, "step 2 (broken) failed with status 1"),
             (["--skip_steps", "2"], 2,
              "step 3 (decide) cannot decide its commands: results.json: missing")]
    for flags, status, words in cases:
        with pytest.raises(SystemExit) as exit_:
            campaign_cli.main(base + flags)
        err = [line for line in capfd.readouterr().err.splitlines() if line.startswith("error:")]
        assert exit_.value.code == status and len(err) == 1 and words in err[0], err
    toy_plan.unlink()
    assert campaign_cli.main(base + ["--skip_steps", "2-3"]) == 0
    assert json.loads(toy_plan.read_text()) == {"a": 1}       # step 1 ran, from a real process
    out = capfd.readouterr().out
    assert "2. [skipped] broken" in out and "step 3/3: decide: skipped" in out
    assert "3 steps (2 skipped)" in out
