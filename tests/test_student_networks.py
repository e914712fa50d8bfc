"""Student construction (distillers/common.py): the teacher's copy, a copy with a new input, or a smaller
architecture from config changes."""

import pytest
import torch

from stepdistill.distillers.common import StudentArchitecture, build_student, copy_student, parameter_count
from stepdistill.errors import ConfigError
from tiny_models import tiny_class_unet


def test_copy_with_a_new_input_starts_as_the_teacher():
    teacher = tiny_class_unet()
    student = copy_student(teacher, time_cond_proj_dim=16)
    assert student.config.time_cond_proj_dim == 16
    x, t, labels = torch.randn(2, 1, 8, 8), torch.tensor([10, 500]), torch.tensor([1, 2])
    with torch.no_grad():
        a = teacher(x, t, None, class_labels=labels).sample
        b = student(x, t, None, class_labels=labels, timestep_cond=torch.randn(2, 16)).sample
    torch.testing.assert_close(a, b)  # the new input's weights start at zero
    assert all(p.requires_grad for p in student.parameters()) and student is not teacher


def test_smaller_architecture_from_scratch_and_refused_from_the_teacher():
    teacher = tiny_class_unet()
    half = StudentArchitecture(changes={"block_out_channels": [4, 8]}, init="scratch")
    student = build_student(teacher, half)
    assert list(student.config.block_out_channels) == [4, 8]
    assert parameter_count(student) < parameter_count(teacher) / 2
    with pytest.raises(ConfigError, match=r"distill.student.changes alter the shape of \d+ teacher weights .*"
                                          "set distill.student.init: scratch"):
        build_student(teacher, StudentArchitecture(changes={"block_out_channels": [4, 8]}, init="teacher"))
    with pytest.raises(ConfigError, match="UNet2DConditionModel has no config option 'channels'"):
        build_student(teacher, StudentArchitecture(changes={"channels": 3}, init="scratch"))
    same = build_student(teacher, StudentArchitecture())
    assert all(torch.equal(p, q) for p, q in zip(same.parameters(), teacher.parameters()))
