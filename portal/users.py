"""Portal users by name, for the command lines of both apps."""

from __future__ import annotations

from django.contrib.auth import get_user_model
from django.contrib.auth.models import User
from django.core.exceptions import ValidationError


def find_user(name: str) -> User:
    user_model = get_user_model()
    user = user_model.objects.filter(**{user_model.USERNAME_FIELD: name}).first()
    if user is None:
        raise ValidationError(f"There is no portal user {name!r}.")
    return user
