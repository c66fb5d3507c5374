from twisted.application.service import ServiceMaker

ocppgw = ServiceMaker(
    "ocppgw",
    "ocppgw.tap",
    "OCPP-J gateway between charge stations and RabbitMQ",
    "ocppgw",
)
