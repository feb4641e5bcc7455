"""The whole journey through the real broker, a real worker, SQL and the SendGrid stand-in."""

from __future__ import annotations

from contract_dispatch import notify_signatories, send_contract
from tests.support import all_emails_sent, contract_payload, wait_for_contract


def test_send_deliver_sign_notify(worker, standin):
    payload = contract_payload(
        signatories=[
            {"email": "boss-a@example.com", "name": "Alice"},
            {"email": "boss-b@example.com"},
        ]
    )
    receipt = send_contract(**payload)
    assert receipt.status == "queued"

    report = wait_for_contract(payload["contract_id"], all_emails_sent(1), what="the invitation to be sent")
    assert report.status == "sent"
    (invitation,) = standin.accepted_for(f"invitation:{payload['contract_id']}:")
    assert invitation.to == [payload["email"]]
    assert report.emails[0].provider_message_id == invitation.message_id
    assert f"https://app.example.com/contracts/{payload['contract_id']}" in invitation.content("text/plain")

    notify_signatories(
        contract_id=payload["contract_id"],
        legal_name=payload["company_name"],
        accepted_sections=["conditions", "tarifs"],
    )
    final = wait_for_contract(
        payload["contract_id"],
        lambda r: r.status == "signed" and all_emails_sent(3)(r),
        what="both signatories to be told",
    )
    notified = sorted(e.to for e in final.emails if e.kind == "signed_notification")
    assert notified == ["boss-a@example.com", "boss-b@example.com"]
    received = sorted(r.to[0] for r in standin.accepted_for(f"signed_notification:{payload['contract_id']}:"))
    assert received == notified
