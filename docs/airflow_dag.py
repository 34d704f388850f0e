"""A nightly bq2sftp export from Airflow.

bq2sftp does the whole transfer in one process, so the task is a plain container (or Bash)
command. Exit codes tell Airflow what happened: 0 done, 2 configuration, 3 credentials or
permissions, 4 BigQuery, 5 SFTP server, 6 interrupted (a retry with --resume continues it).
Retrying on 4, 5 and 6 is safe: --resume keeps committed files and continues each stream
at its first uncommitted row.
"""
from datetime import datetime, timedelta

from airflow import DAG
from airflow.providers.cncf.kubernetes.operators.pod import KubernetesPodOperator

with DAG(
    dag_id="orders_to_partner",
    schedule="0 3 * * *",
    start_date=datetime(2026, 1, 1),
    catchup=False,
    default_args={"retries": 3, "retry_delay": timedelta(minutes=5)},
) as dag:
    KubernetesPodOperator(
        task_id="export",
        name="bq2sftp-orders",
        image="europe-docker.pkg.dev/my-project/bq2sftp/bq2sftp:1",
        arguments=[
            "export",
            "--from=bq://my-project.sales.orders",
            # Only the day being exported; Airflow renders {{ ds }}.
            "--where=order_date = DATE '{{ ds }}'",
            "--to=sftp://partner@sftp.example.com/incoming",
            "--prefix=orders-{{ ds_nodash }}",
            "--format=csv",
            "--compression=gzip",
            "--resume",
            "--state-file=/var/lib/bq2sftp/orders-{{ ds_nodash }}.json",
            "--log-format=json",
        ],
        service_account_name="bq2sftp",
        env_vars={"SFTP_PASSWORD": "{{ var.value.partner_sftp_password }}"},
        get_logs=True,
    )
