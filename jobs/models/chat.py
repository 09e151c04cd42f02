"""Conversations with a session's model or a model service's, kept after the session ends (or the service's
replicas come and go)."""

from __future__ import annotations

from django.conf import settings
from django.db import models

from jobs.models.services import ModelService
from jobs.models.sessions import LLMSession


class Conversation(models.Model):
    """A chat with a session's model, kept after the session ends, or with a model service by its name, whichever of
    its replicas answers (exactly one of the two is set)."""

    session = models.ForeignKey(
        LLMSession, null=True, blank=True, on_delete=models.CASCADE, related_name="conversations"
    )
    # PROTECT, as its replicas have it: a service is stopped, not deleted, and deleting one must not take its users'
    # conversations with it unseen.
    service = models.ForeignKey(
        ModelService, null=True, blank=True, on_delete=models.PROTECT, related_name="conversations"
    )
    # Who chats: the session's owner, or someone it is shared with; each sees only their own conversations.
    owner = models.ForeignKey(settings.AUTH_USER_MODEL, on_delete=models.CASCADE, related_name="conversations")
    title = models.CharField(max_length=200, default="New chat")
    system_prompt = models.TextField(blank=True)
    created_at = models.DateTimeField(auto_now_add=True)
    updated_at = models.DateTimeField(auto_now=True)

    class Meta:
        ordering = ["-updated_at"]
        constraints = [
            models.CheckConstraint(
                condition=models.Q(session__isnull=False, service__isnull=True)
                | models.Q(session__isnull=True, service__isnull=False),
                name="conversation_with_a_session_or_a_service",
            )
        ]

    def __str__(self) -> str:
        return self.title


class ChatMessage(models.Model):
    class Role(models.TextChoices):
        USER = "user", "You"
        ASSISTANT = "assistant", "Model"

    conversation = models.ForeignKey(Conversation, on_delete=models.CASCADE, related_name="messages")
    role = models.CharField(max_length=10, choices=Role.choices)
    content = models.TextField()
    # The functions a reply asked for, in OpenAI's shape ({id, type, function: {name, arguments}}), kept so that the
    # page shows them and the conversation goes back to the model as it was; the portal never runs them.
    tool_calls = models.JSONField(default=list, blank=True)
    created_at = models.DateTimeField(auto_now_add=True)
    # Per reply: what researchers otherwise measure by hand.
    ttft_ms = models.PositiveIntegerField(null=True, blank=True)
    tokens_per_s = models.FloatField(null=True, blank=True)
    prompt_tokens = models.PositiveIntegerField(null=True, blank=True)
    completion_tokens = models.PositiveIntegerField(null=True, blank=True)

    class Meta:
        ordering = ["created_at", "pk"]

    def __str__(self) -> str:
        return f"{self.role}: {self.content[:40]}"
