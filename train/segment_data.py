"""Kept until train/segment.py is rewritten: the digit_scenes data set now lives in train.digit_scenes."""

from train.digit_scenes import *
