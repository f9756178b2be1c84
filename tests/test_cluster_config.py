"""ray_cluster.yaml passes Ray's own cluster-config validation and describes the node types dsq relies on."""

from pathlib import Path

import yaml
from ray.autoscaler._private.util import prepare_config, validate_config

CONFIG = Path(__file__).resolve().parents[1] / "ray_cluster.yaml"


def test_cluster_config_is_valid_for_the_ray_launcher():
    config = yaml.safe_load(CONFIG.read_text())
    prepared = prepare_config(config)  # fills in the provider's defaults, as `ray up` does
    validate_config(prepared)
    types = prepared["available_node_types"]
    assert prepared["head_node_type"] == "head"
    assert types["gpu"]["min_workers"] == 0 and types["gpu"]["max_workers"] >= 1
    assert types["api"]["resources"]["dsq_api"] > 0
    assert any("requirements.txt" in command for command in prepared["setup_commands"])


def test_cluster_config_tells_one_storage_story():
    """PostgreSQL on the head, checkpoints on S3 through the nodes' instance profile; no shared file system."""
    text = CONFIG.read_text()
    config = yaml.safe_load(text)
    head = " ".join(config["head_setup_commands"])
    assert "install -y -q postgresql" in head and "createdb -O dsq dsq" in head and "5432/dsq" in head
    assert "export DSQ_ARTIFACTS=s3://" in head and "export RAY_ADDRESS=" in head
    types = config["available_node_types"]
    assert all(types[name]["node_config"]["IamInstanceProfile"] == {"Name": "dsq-node"} for name in ("gpu", "api"))
    assert "DSQ_HOME" not in text and "/shared" not in text and "/mnt" not in text


def test_a_broken_config_is_rejected():
    config = yaml.safe_load(CONFIG.read_text())
    config["available_node_types"]["gpu"]["max_workers"] = "many"
    try:
        validate_config(prepare_config(config))
    except Exception as error:  # noqa: BLE001 - Ray raises jsonschema's or its own errors
        assert "many" in str(error) or "max_workers" in str(error)
    else:
        raise AssertionError("an invalid max_workers passed validation")
