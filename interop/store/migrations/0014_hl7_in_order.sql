-- HL7 v2 messages of one sender are processed in the order they arrived, whatever the number of
-- workers (issue 14: workers default to one per core): their process-hl7 jobs are a series per
-- sender, ordered by the message id, which is a bigserial; the job's seq must hold it.
ALTER TABLE job ALTER COLUMN seq TYPE bigint;
UPDATE job SET series = 'hl7:' || coalesce(m.sending_application, '') || '|' || coalesce(m.sending_facility, ''),
               seq = m.id
  FROM hl7_message m
 WHERE job.kind = 'process-hl7' AND job.status IN ('queued', 'running') AND job.series IS NULL
   AND m.id = (job.payload->>'message')::bigint;
