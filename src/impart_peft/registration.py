"""Registration of ImPart as a PEFT method.

PEFT's ``register_peft_method`` accepts only names already in its ``PeftType`` enum, and transformers reads
``peft_config.peft_type.value``, so ``IMPART`` is added to ``PeftType`` itself, as a real member (``PeftType("IMPART")``,
``PeftType.IMPART``, ``"IMPART" in list(PeftType)`` all work, and it serialises as the string ``"IMPART"``).

Why this is safe: the member is added once, only if absent, with the same ``str`` value a native member would have;
no existing member or mapping is changed; PEFT's own registry (``PEFT_TYPE_TO_CONFIG_MAPPING`` and friends) is then
filled by PEFT's ``register_peft_method``, which runs all of PEFT's checks (unique name, unique prefix). A future PEFT
that ships ``IMPART`` natively is detected and used as is.
"""

from __future__ import annotations

from peft.utils import PeftType

__all__ = ["IMPART_PEFT_TYPE", "PEFT_METHOD_NAME", "register"]

PEFT_METHOD_NAME = "impart"


def _extend_peft_type(name: str) -> PeftType:
    if name in PeftType.__members__:
        return PeftType[name]
    member = str.__new__(PeftType, name)
    member._name_ = name
    member._value_ = name
    member.__objclass__ = PeftType
    if hasattr(PeftType, "_add_member_"):  # Python >= 3.13
        PeftType._add_member_(name, member)
    else:
        PeftType._member_map_[name] = member
        PeftType._member_names_.append(name)
        type.__setattr__(PeftType, name, member)  # EnumType.__setattr__ refuses to rebind members
    PeftType._value2member_map_[name] = member
    return member


IMPART_PEFT_TYPE = _extend_peft_type(PEFT_METHOD_NAME.upper())


def register(config_cls: type, model_cls: type) -> None:
    """Register the ImPart config and tuner with PEFT (idempotent)."""
    from peft.mapping import PEFT_TYPE_TO_CONFIG_MAPPING
    from peft.utils import register_peft_method

    if PEFT_TYPE_TO_CONFIG_MAPPING.get(IMPART_PEFT_TYPE) is config_cls:
        return
    register_peft_method(name=PEFT_METHOD_NAME, config_cls=config_cls, model_cls=model_cls, prefix="impart_")
