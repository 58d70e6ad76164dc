"""Motion-capture ingestion: CMU ASF/AMC and cgspeed BVH parsers, forward kinematics,
and conversion to the project's Human3.6M-17 Parquet table."""

from .amc import Motion, parse_amc, parse_amc_text
from .asf import Bone, Skeleton, parse_asf, parse_asf_text
from .bvh import Bvh, BvhJoint, bvh_forward_kinematics, cgspeed_h36m17, parse_bvh, parse_bvh_text
from .convert import convert_directory
from .errors import MocapFormatError
from .kinematics import H36M17_JOINTS, asf_amc_h36m17, cmu_to_zup, forward_kinematics

__all__ = [
    "Bone", "Bvh", "BvhJoint", "H36M17_JOINTS", "MocapFormatError", "Motion", "Skeleton",
    "asf_amc_h36m17", "bvh_forward_kinematics", "cgspeed_h36m17", "cmu_to_zup",
    "convert_directory", "forward_kinematics", "parse_amc", "parse_amc_text", "parse_asf",
    "parse_asf_text", "parse_bvh", "parse_bvh_text",
]
