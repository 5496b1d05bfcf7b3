"""Parsing what the kernel and losetup report, and the attach settings."""

from __future__ import annotations

from pathlib import Path

import pydantic
import pytest

from edgevisor.storage.attach import AttachedVolume, AttachError, AttachSettings
from edgevisor.storage.hostfs import parse_losetup_json, parse_mountinfo

MOUNTINFO = (
    "22 1 254:1 / / rw,relatime shared:1 - ext4 /dev/vda rw\n"
    "43 22 0:39 / /tmp/s/v1/fuse rw,nosuid,nodev,relatime shared:7 master:2 - "
    "fuse.edgevisor-image edgevisor:v1 rw,user_id=0,group_id=0,allow_other\n"
    "44 22 7:3 / /tmp/with\\040space\\011tab rw,relatime - ext4 /dev/loop3 rw\n"
    "garbage line\n"
)


def test_parse_mountinfo_reads_optional_fields_and_escapes() -> None:
    entries = parse_mountinfo(MOUNTINFO)
    assert [e.mount_point for e in entries] == ["/", "/tmp/s/v1/fuse", "/tmp/with space\ttab"]
    fuse = entries[1]
    assert (fuse.dev, fuse.fstype, fuse.source) == ("0:39", "fuse.edgevisor-image", "edgevisor:v1")
    assert entries[2].source == "/dev/loop3" and entries[2].dev == "7:3"


def test_parse_losetup_json_strips_padding_and_deleted_marker() -> None:
    text = """{
       "loopdevices": [
          {"name": "/dev/loop1", "maj:min": "  7:1  ",
           "back-file": "/tmp/s/v1/fuse/image (deleted)", "back-maj:min": "      0:40 "},
          {"name": "/dev/loop0", "maj:min": "7:0", "back-file": null, "back-maj:min": null}
       ]
    }"""
    loops = parse_losetup_json(text)
    assert loops[0].device == "/dev/loop1"
    assert (loops[0].dev, loops[0].backing_dev) == ("7:1", "0:40")
    assert loops[0].backing_file == "/tmp/s/v1/fuse/image"
    assert loops[1].backing_file == "" and loops[1].backing_dev == ""
    assert parse_losetup_json("") == []


def test_settings_are_frozen_and_strict() -> None:
    s = AttachSettings()
    assert s.fstype == "ext4"
    with pytest.raises(pydantic.ValidationError):
        s.fstype = "xfs"  # type: ignore[misc]
    with pytest.raises(pydantic.ValidationError):
        AttachSettings(bogus=1)  # type: ignore[call-arg]
    with pytest.raises(pydantic.ValidationError):
        AttachSettings(stop_timeout_s=0)
    for name, info in AttachSettings.model_fields.items():
        assert info.description, name


@pytest.mark.parametrize("name", ["", "a/b", ".hidden"])
def test_attachment_names_cannot_escape_the_state_dir(tmp_path: Path, name: str) -> None:
    with pytest.raises(AttachError):
        AttachedVolume(name, state_dir=tmp_path, target=tmp_path / "x", kind="file", arg="x")
