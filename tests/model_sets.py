"""Which registered models the expensive checks run on."""

import zoo


def smallest_of_each_family(extra=("seresnet50",)) -> list[str]:
    """One model per family (its smallest variant), plus `extra`.

    A family's variants run the same code on other data (depths, widths, resolution), which
    the parameter counts and feature shapes of tests/test_models.py check for every variant,
    abstractly. SE-ResNet-50 is added because its squeeze-excitation option changes the code path.
    """
    by_family: dict[str, str] = {}
    for name in zoo.list_models():
        spec = zoo.get_spec(name)
        if spec.family not in by_family or spec.num_params < zoo.get_spec(by_family[spec.family]).num_params:
            by_family[spec.family] = name
    return sorted({*by_family.values(), *extra})
