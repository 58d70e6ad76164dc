"""Motion-capture ingestion: CMU ASF/AMC and BVH parsers, forward kinematics, skeleton maps
(which BVH joints give each Human3.6M-17 joint) and conversion to the project's Human3.6M-17 Parquet table."""

from .amc import Motion, parse_amc, parse_amc_text
from .asf import Bone, Skeleton, parse_asf, parse_asf_text
from .bvh import Bvh, BvhJoint, bvh_forward_kinematics, parse_bvh, parse_bvh_text
from .convert import convert_directory
from .errors import MocapFormatError
from .kinematics import H36M17_JOINTS, asf_amc_h36m17, cmu_to_zup, forward_kinematics
from .skeleton import (
    SkeletonMap, SkeletonMapError, builtin_map, builtin_maps, detect_skeleton_map, load_skeleton_map,
)

__all__ = [
    "Bone", "Bvh", "BvhJoint", "H36M17_JOINTS", "MocapFormatError", "Motion", "Skeleton", "SkeletonMap",
    "SkeletonMapError", "asf_amc_h36m17", "builtin_map", "builtin_maps", "bvh_forward_kinematics",
    "cmu_to_zup", "convert_directory", "detect_skeleton_map", "forward_kinematics", "load_skeleton_map",
    "parse_amc", "parse_amc_text", "parse_asf", "parse_asf_text", "parse_bvh", "parse_bvh_text",
]
