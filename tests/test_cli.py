import pytest

import trainA
from conftest import assert_one_line_error, run_main


def parse(*argv):
    return trainA.config_from_args(trainA.SPEC.parse_args(list(argv)))


@pytest.mark.parametrize("text,expected", [("true", True), ("True", True), ("1", True), ("YES", True), ("on", True),
                                           ("false", False), ("False", False), ("0", False), ("no", False)])
def test_boolean_flags_accept_every_common_spelling(text, expected):
    assert parse("-bn", text).batch_norm is expected
    assert parse(f"--batch_norm={text}").batch_norm is expected
    assert parse(f"--data_aug={text}").data_aug is expected


def test_bare_boolean_flag_means_true():
    assert parse("--batch_norm").batch_norm is True
    assert parse("--no_pictures").pictures is False


@pytest.mark.parametrize("text", ["5,5,3,3,3", "[5, 5, 3, 3, 3]", "(5,5,3,3,3)", "5 5 3 3 3", "[5,5,3,3,3]"])
def test_list_flags_accept_commas_and_python_list_syntax(text):
    assert parse("-fs", text).filter_size == (5, 5, 3, 3, 3)
    assert parse(f"--filter_size={text}").filter_size == (5, 5, 3, 3, 3)


def test_single_values_and_one_element_lists_are_ints():
    assert parse("-fs", "5").filter_size == 5
    assert parse("--filter_size=[7]").filter_size == 7
    assert parse("-nf", "32,64,64,128,128").num_filters == (32, 64, 64, 128, 128)


@pytest.mark.parametrize("text,expected", [("1e-05", 1e-5), ("0.0001", 1e-4), ("3e-4", 3e-4)])
def test_float_spellings(text, expected):
    assert parse(f"--lr={text}").lr == pytest.approx(expected)


def test_ints_written_as_floats_parse():
    assert parse("--num_filters=64.0").num_filters == 64
    assert parse("--dense_neurons=128.0").dense_neurons == 128


def test_assignment_short_flags():
    cfg = parse("-wp", "proj", "-we", "me", "-e", "3", "-b", "16", "-lr", "0.01", "-nf", "16", "-a", "mish",
                "-d", "0.3", "-bn", "false", "-fs", "7", "-fo", "half", "-p", "/data/x", "-dn", "64", "-da", "no")
    assert (cfg.wandb_project, cfg.wandb_entity, cfg.epochs, cfg.batch_size, cfg.lr) == ("proj", "me", 3, 16, 0.01)
    assert (cfg.num_filters, cfg.activation, cfg.dropout, cfg.batch_norm) == (16, "Mish", 0.3, False)
    assert (cfg.filter_size, cfg.filter_org, cfg.data_dir, cfg.dense_neurons, cfg.data_aug) == (7, "half", "/data/x", 64, False)


def test_dashed_aliases_and_choices_any_case():
    cfg = parse("--batch-size", "12", "--filter-org", "DOUBLE", "--activation", "leakyrelu", "--optimizer", "SGD")
    assert (cfg.batch_size, cfg.filter_org, cfg.activation, cfg.optimizer) == (12, "double", "LeakyReLU", "sgd")
    assert parse("-fo", "1.5").filter_org == 1.5
    assert parse("-fo", "const").filter_org == "same"


def test_an_off_choice_also_takes_false_as_yaml_turns_a_bare_off_into():
    """A sweep file's `values: [frozen, init, off]` reaches the script as --whiten=False."""
    assert parse("--whiten=False").whiten == "off" and parse("--cache", "false").cache == "off"
    assert parse("--amp=False").amp == "off"
    with pytest.raises(SystemExit):
        parse("--global_pool=False")  # no "off" among its choices: still an error


@pytest.mark.parametrize("argv,needle", [
    (["-a", "swish"], "-a/--activation: 'swish' is not one of ReLU"),
    (["-bn", "maybe"], "'maybe' is not a boolean"),
    (["-fs", "3,x"], "not an integer list"),
    (["-e", "0"], "-e/--epochs: 0 must be >= 1"),
    (["-lr", "-1"], "--lr/--learning_rate: -1 must be > 0"),
    (["-d", "1.5"], "-d/--dropout: 1.5 must be < 1"),
    (["-b", "2.5"], "not an integer"),
    (["--lr", "nan"], "not a finite number"),
    (["--val_fraction", "1"], "must be < 1"),
    (["--optimizer", "lion"], "not one of adamw, adam, sgd"),
    (["--bogus_flag", "1"], "unrecognized arguments: --bogus_flag"),
])
def test_bad_flags_exit_2_with_one_line(argv, needle, capsys):
    with pytest.raises(SystemExit) as exit_info:
        trainA.SPEC.parse_args(argv)
    assert exit_info.value.code == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and needle in err[0], err


def test_dry_run_builds_without_data(capsys):
    code = trainA.main(["--dry_run", "--data_dir", "/does/not/exist", "-nf", "8", "-is", "64"])
    assert code == 0
    out = capsys.readouterr().out
    assert "multiply-adds per image" in out and "features.4.conv" in out


def test_issue_dry_run_command_from_the_agent_exits_0():
    result = run_main("trainA.py", "--dry_run", "--batch_norm=False", "--filter_size=[5, 5, 3, 3, 3]",
                        "--num_filters=64", "--filter_org=double", "--activation=Mish", "--data_aug=True",
                        "--lr=1e-05")
    assert result.returncode == 0, result.stderr
    assert "Mish-nf64-double-fs5,5,3,3,3-nobn-d0.2-aug-lr1e-05" in result.stdout


@pytest.mark.parametrize("argv,needles", [
    (["--data_dir", "/no/such/dir", "-e", "1", "-is", "32"], ["data_dir '/no/such/dir' does not exist", "--data_dir"]),
    (["-a", "unknown"], ["--activation", "unknown"]),
    (["--image_size", "16"], ["image_size=16 is too small", "raise --image_size"]),
    (["-nf", "8,8,8"], ["lists 3 values for 5 blocks"]),
    (["-nf", "1024", "-fo", "double"], ["> 4096", "--num_filters"]),
    (["--device", "cuda:7", "--data_dir", "x"], []),
])
def test_user_errors_are_one_line_without_traceback(argv, needles):
    result = run_main("trainA.py", *argv, "--wandb_mode", "disabled")
    if argv[:1] == ["--device"]:
        # On a machine without that GPU this must be one clear line; with it, data_dir fails instead.
        assert_one_line_error(result)
        return
    assert_one_line_error(result, *needles)


def test_run_name_holds_the_swept_hyperparameters():
    cfg = parse("-a", "gelu", "-nf", "64", "-fo", "double", "-fs", "5,5,3,3,3", "-bn", "true", "-d", "0.3",
                "-da", "true", "-lr", "0.001")
    assert trainA.run_name(cfg) == "GELU-nf64-double-fs5,5,3,3,3-bn-d0.3-aug-lr0.001"
    cfg = parse("-nf", "8,16,16,32,32", "-fs", "3", "-bn", "false", "-d", "0", "-da", "false")
    assert trainA.run_name(cfg) == "SiLU-nf8,16,16,32,32-fs3-nobn-d0-noaug-lr0.002"
    assert trainA.run_name(parse("--convs_per_block", "2")) == "SiLU-nf32-double-fs3x2-bn-d0.2-aug-lr0.002"
    assert trainA.run_name(parse("--run_name", "mine")) == "mine"


def test_a_misspelt_flag_is_one_line_naming_the_flag_it_meant(tmp_path):
    from conftest import assert_one_line_error, run_main

    assert_one_line_error(run_main("trainA.py", "--epcohs", "2"), "unrecognized arguments: --epcohs 2",
                          "did you mean --epochs?")
    assert_one_line_error(run_main("trainB.py", "--backbone_lrr=0.1"), "did you mean --backbone_lr?")
    result = run_main("trainA.py", "--qqqqqq")
    assert result.returncode == 2 and "did you mean" not in result.stderr


def test_an_unknown_arch_suggests_each_close_name_once():
    from conftest import run_main

    pytest.importorskip("timm")
    line = run_main("trainB.py", "--arch", "resnet5").stderr
    suggested = line.split("did you mean ", 1)[1].split("?")[0].split(", ")
    assert "resnet50" in suggested and len(suggested) == len(set(suggested))


def test_an_error_is_not_preceded_by_the_run_name(tmp_path):
    from conftest import run_main

    result = run_main("trainA.py", "--data_dir", str(tmp_path / "missing"))
    assert result.returncode == 2 and result.stdout == ""
