from twisted.application.service import ServiceMaker

qmailtx = ServiceMaker(
    "qmailtx",
    "qmailtx.tap",
    "qmail-style mail server: ESMTP, durable queue, Maildir delivery",
    "qmailtx",
)
