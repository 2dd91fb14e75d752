"""The probe's path: admission behind the gateway, the stages (intake, engines, fusion, enrolment)
behind thin Celery tasks, and the parts they use (detection, engines, galleries, fusion)."""
