import numpy as np
import pytest
import torch
from PIL import Image

import trainA
from conftest import TINY_ARGS, assert_one_line_error, only_dir, run_main
from data import NatureData, build_eval_transform
from models import ACTIVATION_NAMES, build_cnn
from utils import confusion, pictures
from utils.runtime import Precision
from utils.evaluation import evaluate


@pytest.fixture
def test_set(tiny_data):
    return NatureData(tiny_data, "test", build_eval_transform(32), image_size=32)


def tiny_model(activation="ReLU"):
    torch.manual_seed(0)
    return build_cnn(3, 32, num_filters=4, filter_org="same", activation=activation, dense_neurons=8).eval()


def test_prediction_grid_size_and_labels_match_the_model(test_set, tmp_path):
    model = tiny_model()
    predictions = pictures.prediction_grid(model, test_set, torch.device("cpu"), tmp_path / "g.png", per_class=3,
                                           seed=1, tile=64)
    image = Image.open(tmp_path / "g.png")
    assert image.size == (3 * (64 + 6) + 6, 3 * (64 + 30 + 6) + 6)
    assert [p.true_label for p in predictions] == [0, 0, 0, 1, 1, 1, 2, 2, 2]
    with torch.no_grad():
        for p in predictions:
            logits = model(test_set[p.index][0].unsqueeze(0))
            assert int(logits.argmax()) == p.predicted
            assert float(logits.softmax(1).max()) == pytest.approx(p.confidence, abs=1e-5)
    again = pictures.prediction_grid(model, test_set, torch.device("cpu"), tmp_path / "h.png", seed=1, tile=64)
    assert [p.index for p in again] == [p.index for p in predictions]  # same images for a seed
    # Wrong predictions get a red frame, right ones green: check one pixel of each frame.
    pixels = np.asarray(image)
    for p in predictions[:3]:
        column = predictions[:3].index(p)
        frame = tuple(pixels[6 - 2, 6 + column * 70 + 10])
        assert frame == (pictures.GREEN if p.predicted == p.true_label else pictures.RED)


def test_filters_and_feature_maps(test_set, tmp_path):
    model = tiny_model()
    image = pictures.filter_grid(model, tmp_path / "f.png", tile=10)
    assert image.size == (2 * 12 + 2, 2 * 12 + 2)  # 4 filters on a 2x2 grid with 2 px padding
    maps = pictures.feature_maps(model, test_set[0][0], tmp_path / "m.png")
    assert maps.size == (4 * 34 + 2, 34 + 2)  # 4 channels of 32x32 in one row of 8 columns


@pytest.mark.parametrize("activation", ACTIVATION_NAMES)
def test_guided_backprop_gives_nonzero_maps_of_the_input_shape_for_every_activation(activation, test_set):
    model = tiny_model(activation)
    image = test_set[0][0]
    maps = pictures.guided_backprop(model, image, model.features[-1], [0, 1, 2])
    assert maps.shape == (3, 3, 32, 32)
    assert all(m.abs().sum() > 0 for m in maps)
    assert not torch.equal(maps[0], maps[1])


def test_guided_backprop_differs_from_plain_gradient_for_relu(test_set):
    model = tiny_model("ReLU")
    image = test_set[1][0]
    guided = pictures.guided_backprop(model, image, model.features[-1], [0])[0]
    x = image.unsqueeze(0).clone().requires_grad_(True)
    captured = {}
    handle = model.features[-1].register_forward_hook(lambda m, i, o: captured.__setitem__("o", o))
    model(x)
    handle.remove()
    captured["o"][0, 0].max().backward()
    assert not torch.allclose(guided, x.grad[0])


def test_confusion_matrix_counts_and_picture(tmp_path):
    matrix = pictures.confusion_counts([0, 0, 1, 2, 2, 2], [0, 1, 1, 2, 0, 2], 3)
    assert matrix.tolist() == [[1, 1, 0], [0, 1, 0], [1, 0, 2]]
    image = pictures.confusion_matrix_picture(matrix, ["a", "bb", "ccc"], tmp_path / "c.png", cell=40)
    assert image.size == (90 + 4 * 40 + 10, 90 + 3 * 40 + 30)


def test_run_leaves_every_picture_and_logs_them_offline(tiny_data, tmp_path):
    from wandb_log import read_records

    out = tmp_path / "runs"
    args = [a if a != "disabled" else "offline" for a in TINY_ARGS if a != "--no_pictures"]
    assert trainA.main(["--data_dir", str(tiny_data), "-e", "1", "--output_dir", str(out), *args]) == 0
    run_dir = only_dir(out)
    for name in ("prediction_grid.png", "filters.png", "feature_maps.png", "guided_backprop.png", "confusion_matrix.png"):
        assert Image.open(run_dir / name).size[0] > 10, name
    import wandb

    wandb.teardown()  # wait for wandb's writer process to flush and exit before reading its file
    (log,) = run_dir.glob("wandb/offline-run-*/run-*.wandb")
    logged = {item.key or item.nested_key[0] for r in read_records(log) if r.WhichOneof("record_type") == "history"
              for item in r.history.item}
    assert {"prediction_grid", "first_layer_filters", "first_layer_feature_maps", "guided_backprop",
            "confusion_matrix", "confusion_matrix_table"} <= logged


def test_predict_matches_evaluate_on_a_file_and_a_folder(tiny_data, tmp_path, capsys):
    out = tmp_path / "runs"
    assert trainA.main(["--data_dir", str(tiny_data), "-e", "1", "--output_dir", str(out), *TINY_ARGS]) == 0
    run_dir = only_dir(out)
    capsys.readouterr()
    folder = tiny_data / "val" / "fungi"
    assert trainA.main(["--predict", str(folder), "--checkpoint", str(run_dir / "best.pt")]) == 0
    lines = capsys.readouterr().out.strip().splitlines()
    assert len(lines) == 4 and all(len(line.split(", ")) == 3 for line in lines)
    # top-1 of --predict equals what evaluate() predicts for the same images
    _, model, transform = trainA.rebuild_from_checkpoint(torch.load(run_dir / "best.pt", weights_only=True))
    test = NatureData(tiny_data, "test", transform, image_size=32)
    loader = torch.utils.data.DataLoader(test, batch_size=64)
    stats = evaluate(model, loader, Precision(torch.device("cpu")), 3, show_progress=False, keep_predictions=True)
    fungi = [i for i, s in enumerate(test.samples) if s.label == 1]
    expected = [test.classes[stats.predictions[i]] for i in fungi]
    assert [line.split(": ")[1].split(" ")[0] for line in lines] == expected
    single = str(folder / "fungi_000.jpg")
    assert trainA.main(["--predict", single, "--checkpoint", str(run_dir / "best.pt")]) == 0
    assert capsys.readouterr().out.startswith(single + ": ")


def test_predict_unreadable_file_is_one_line(tiny_data, tmp_path):
    out = tmp_path / "runs"
    assert trainA.main(["--data_dir", str(tiny_data), "-e", "1", "--output_dir", str(out), *TINY_ARGS]) == 0
    run_dir = only_dir(out)
    bad = tmp_path / "bad.jpg"
    bad.write_text("not an image")
    result = run_main("trainA.py", "--predict", str(bad), "--checkpoint", str(run_dir / "best.pt"))
    assert_one_line_error(result, "cannot read image", str(bad))
    missing = run_main("trainA.py", "--predict", str(tmp_path / "nope.jpg"), "--checkpoint", str(run_dir / "best.pt"))
    assert_one_line_error(missing, "does not exist")


def test_the_prediction_grid_of_fifty_classes_is_a_readable_picture(tmp_path):
    """50 classes (birds50's count) were a 408 x 4,926 px strip with labels running into the next
    tile; now several classes share a row and every caption is cut to its tile."""
    from PIL import ImageDraw

    from conftest import write_image
    from utils.drawing import MAX_CLASSES_SHOWN, fit_text, font
    from utils.pictures import prediction_grid

    names = [f"Black_footed_Albatross_{i:02d}" for i in range(50)]
    for i, name in enumerate(names):
        write_image(tmp_path / "data" / "train" / name / "a.jpg", (i * 5, 90, 200), (40, 36), seed=i)
        write_image(tmp_path / "data" / "test" / name / "a.jpg", (i * 5, 90, 200), (40, 36), seed=100 + i)
    dataset = NatureData(tmp_path / "data", "test", build_eval_transform(32), image_size=32)
    model = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(3 * 32 * 32, 50))
    predictions = prediction_grid(model, dataset, torch.device("cpu"), tmp_path / "grid.png", per_class=1)
    assert len(predictions) == MAX_CLASSES_SHOWN
    picture = Image.open(tmp_path / "grid.png")
    assert max(picture.size) < 2000 and min(picture.size) > 300, picture.size
    draw, small = ImageDraw.Draw(picture), font(11)
    caption = fit_text(draw, "pred: " + names[7], 128, small, "  97%")
    assert draw.textlength(caption, font=small) <= 128 and caption.endswith("_07  97%") and "\u2026" in caption


@pytest.mark.parametrize("classes", [50, 200])
def test_the_confusion_matrix_is_whole_up_to_sixty_classes_and_says_what_it_leaves_out(tmp_path, classes):
    """50 classes: every class, every mistake (was: the 30 weakest, a row summing to 29 of 30 with
    no word). 200: the 30 weakest and an 'other' column, so every row still sums to its images."""
    rng = np.random.default_rng(1)
    targets = rng.integers(0, classes, 40 * classes)
    predictions = np.where(rng.random(len(targets)) < 0.8, targets, rng.integers(0, classes, len(targets)))
    matrix = pictures.confusion_counts(targets.tolist(), predictions.tolist(), classes)
    names = [f"Black_footed_Albatross_{i:03d}" for i in range(classes)]
    image = pictures.confusion_matrix_picture(matrix, names, tmp_path / "cm.png")
    assert max(image.size) < 2000, image.size
    shown, other = confusion.shown_in_matrix(matrix)
    if classes <= 60:
        assert shown == list(range(classes)) and other is None
    else:
        assert len(shown) == confusion.MAX_CLASSES_SHOWN and other is not None
        assert (matrix[np.ix_(shown, shown)].sum(1) + other == matrix[shown].sum(1)).all()  # rows sum to their images
    pairs = confusion.most_confused(matrix, names, 5)
    assert len(pairs) == 5 and pairs[0][2] == max(matrix[i, j] for i in range(classes) for j in range(classes) if i != j)
    assert pairs[0][2] >= pairs[-1][2] and all(true != predicted for true, predicted, _ in pairs)
